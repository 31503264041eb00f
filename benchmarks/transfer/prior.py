"""Stage 3: the deep weight prior, fitted on the source networks' kernels."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import dwp
from unet3d.model import UNet3D

from ..stages import Stage, digest
from .config import PRIOR, Preset, log
from .keys import stage_key

#: The stage's folder ``prior-<hash>/`` is finished when ``prior.json`` exists.
PRIOR_STAGE = Stage(PRIOR, "prior.json", files=("prior", "figure"))


def fit_prior(
    preset: Preset,
    data_key: Mapping[str, Any],
    sources: Mapping[str, Any],
    work: Path,
    seed: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Stage 3: kernel bank by resolution group, one kernel VAE per group, prior file, figure."""
    checkpoints = [p for net in sources["nets"] for p in net["kernel_sets"]]
    key = stage_key(preset, PRIOR, seed, data_key)
    folder, cached = PRIOR_STAGE.open(work, key)
    if cached is not None:
        return cached
    started = time.perf_counter()
    template = UNet3D(widths=preset.widths)
    bank = dwp.collect_kernels(
        checkpoints,
        group_by="resolution",
        template=template,
        example_input=torch.zeros(1, 1, *preset.crop),
        min_norm=preset.kernel_min_norm or None,
    )
    log(f"kernel bank: {len(bank.kernels)} kernels in {len(bank.groups())} groups")
    prior = dwp.DeepWeightPrior.fit(
        bank,
        latent_dim=preset.latent_dim,
        architecture=preset.vae_architecture,
        hidden=preset.vae_hidden,
        seed=seed,
        progress=progress,
        epochs=preset.vae_epochs,
        device=preset.device,
    )
    bank.save(folder / "bank.pt")
    prior.save(folder / "prior.pt")
    figure = folder / "prior.png"
    try:
        from dwp.plot import plot_prior_samples

        plot_prior_samples(bank, prior, figure, seed=seed)
    except ImportError:  # matplotlib is optional
        figure = None
    summary = {
        "key": digest(key),
        "prior": str(folder / "prior.pt"),
        "figure": None if figure is None else str(figure),
        "n_kernels": len(bank.kernels),
        "groups": {g: len(k) for g, k in bank.groups().items()},
        # each group's test kernels, used for no choice of the fit (DeepWeightPrior.fit)
        "fit": {group: prior.held_out(group) for group in prior.groups},
        "seconds": time.perf_counter() - started,
    }
    return PRIOR_STAGE.finish(folder, summary)

"""Stage 3: the learned priors: the deep weight prior and the kernel Gaussian, fitted on
the source networks' kernels, and the source-trajectory (SWAG) prior of source net 0."""

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
PRIOR_STAGE = Stage(
    PRIOR, "prior.json", files=("prior", "kernel_gaussian_prior", "swag_prior", "figure")
)


def fit_prior(
    preset: Preset,
    data_key: Mapping[str, Any],
    sources: Mapping[str, Any],
    work: Path,
    seed: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Stage 3: kernel bank by resolution group; one kernel VAE (the deep weight prior)
    and one full-covariance Gaussian per group; the SWAG prior of net 0's trajectory; the
    prior files, the held-out fit report and the figure."""
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
    dwp.priors.save_prior(dwp.KernelGaussianPrior.fit(bank), folder / "kernel_gaussian.pt")
    swag = next((net["swag"] for net in sources["nets"] if net.get("swag")), None)
    if swag is not None:  # float32 loc, variance and factor: half the moments' size
        moments = dwp.SWAGMoments.load(swag)
        dwp.priors.save_prior(dwp.SWAGPrior.from_moments(moments), folder / "swag.pt")
    figure = folder / "prior.png"
    try:
        from dwp.plot import plot_prior_samples

        plot_prior_samples(bank, prior, figure, seed=seed)
    except ImportError:  # matplotlib is optional
        figure = None
    summary = {
        "key": digest(key),
        "prior": str(folder / "prior.pt"),
        "kernel_gaussian_prior": str(folder / "kernel_gaussian.pt"),
        "swag_prior": None if swag is None else str(folder / "swag.pt"),
        "figure": None if figure is None else str(figure),
        "n_kernels": len(bank.kernels),
        "groups": {g: len(k) for g, k in bank.groups().items()},
        # each group's test kernels, used for no choice of the fit (DeepWeightPrior.fit)
        "fit": {group: prior.held_out(group) for group in prior.groups},
        "seconds": time.perf_counter() - started,
    }
    return PRIOR_STAGE.finish(folder, summary)

"""Stage 2: the source networks, whose cycles' final weights are the kernel sets.

Each net is trained with cyclical restarts; net 0 also collects the SWAG moments of its
last cycle (the source-trajectory prior).  The stage reports how far each group's kernels
moved from their initialisation: a prior fitted on kernels that barely moved can only act
as weight decay, so this is the first thing to check when a learned prior does not help.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dwp
from unet3d.model import UNet3D
from unet3d.strategies import ModelSpec, get_strategy
from unet3d.train import TrainConfig, train

from ..stages import Stage, digest
from .config import SOURCE, Preset, log
from .data import Data
from .keys import stage_key

#: The stage's folder ``source-<hash>/`` is finished when ``sources.json`` exists.
SOURCE_STAGE = Stage(SOURCE, "sources.json", files=("best", "kernel_sets", "swag"))


def train_config(preset: Preset, **changes: Any) -> TrainConfig:
    """The training settings shared by the source nets and the target runs (``lr``
    defaults to ``preset.lr``)."""
    changes.setdefault("lr", preset.lr)
    return TrainConfig(
        widths=preset.widths,
        size=preset.crop,
        min_lr=preset.min_lr,
        binarise=True,
        device=preset.device,
        amp=preset.amp,
        **{"progress": False, **changes},
    )


def initial_network(preset: Preset, seed: int) -> torch.nn.Module:
    """The network a random-init run of ``seed`` starts from: :func:`unet3d.train.train`
    seeds torch with the run's seed right before its strategy builds the model."""
    torch.manual_seed(seed)
    return get_strategy("random_init").build_model(ModelSpec(widths=preset.widths))


def kernel_displacement(
    preset: Preset, initial: torch.nn.Module, trained: Sequence[str | Path]
) -> dict[str, dict[str, float]]:
    """How far each resolution group's kernels moved from ``initial`` in the ``trained``
    checkpoints of the same net.

    Per group: ``relative`` the median over kernels (and checkpoints) of
    ``||w - w_0|| / ||w_0||``, ``norm_ratio`` the median of ``||w|| / ||w_0||`` and
    ``kernels`` per checkpoint.  A relative displacement of a few percent means the
    kernels are still their random initialisation.
    """
    options = {
        "group_by": "resolution",
        "template": UNet3D(widths=preset.widths),
        "example_input": torch.zeros(1, 1, *preset.crop),
    }
    start = dwp.collect_kernels(initial, **options).groups()
    moved: dict[str, list[torch.Tensor]] = {g: [] for g in start}
    ratio: dict[str, list[torch.Tensor]] = {g: [] for g in start}
    for path in trained:
        for group, kernels in dwp.collect_kernels(str(path), **options).groups().items():
            w0 = start[group].flatten(1)
            w = kernels.flatten(1)
            norm0 = w0.norm(dim=1).clamp_min(1e-12)
            moved[group].append((w - w0).norm(dim=1) / norm0)
            ratio[group].append(w.norm(dim=1) / norm0)
    return {
        group: {
            "kernels": int(start[group].shape[0]),
            "relative": float(torch.cat(moved[group]).median()),
            "norm_ratio": float(torch.cat(ratio[group]).median()),
        }
        for group in start
    }


def train_sources(
    preset: Preset, data: Data, work: Path, seed: int, progress: bool = False
) -> dict[str, Any]:
    """Stage 2: train the source U-Nets; returns the kernel-set checkpoints, their scores,
    net 0's SWAG moments and the kernels' displacement from initialisation per group."""
    key = stage_key(preset, SOURCE, seed, data.key)
    folder, cached = SOURCE_STAGE.open(work, key)
    if cached is not None:
        return cached
    started = time.perf_counter()
    nets = []
    for k in range(preset.source_nets):
        log(f"source net {k + 1}/{preset.source_nets} -> {folder / f'net{k}'}")
        net_seed = seed * 1000 + k
        swag = preset.swag_rank if k == 0 else 0  # net 0's trajectory: the SWAG prior
        config = train_config(
            preset,
            strategy="random_init",
            out_dir=folder / f"net{k}",
            epochs=preset.source_epochs,
            restarts=preset.source_restarts,
            lr_patience=preset.source_patience,
            seed=net_seed,
            swag_rank=swag,
            swag_start=preset.swag_start,
            swag_every=preset.swag_every,
            progress=progress,
        )
        result = train(config, data.source_train, data.source_val, resume=True)
        kernel_sets = [str(p) for p in result.restart_checkpoints] or [
            str(folder / f"net{k}" / "last.pt")
        ]
        best = result.history[result.best_epoch] if result.best_epoch >= 0 else {}
        nets.append(
            {
                "best": str(folder / f"net{k}" / "best.pt"),
                "kernel_sets": kernel_sets,
                "swag": str(folder / f"net{k}" / "swag.pt") if swag else None,
                "val_dice": best.get("val_dice"),
                "epochs": len(result.history),
                "cycle_epochs": _cycle_lengths(result.history),
                "displacement": kernel_displacement(
                    preset, initial_network(preset, net_seed), kernel_sets
                ),
            }
        )
    summary = {
        "key": digest(key),
        "nets": nets,
        "displacement": mean_displacement(nets),
        "seconds": time.perf_counter() - started,
    }
    return SOURCE_STAGE.finish(folder, summary)


def _cycle_lengths(history: Sequence[dict[str, Any]]) -> list[int]:
    """Epochs per cycle of a run's history (its entries carry their ``cycle``)."""
    cycles = [int(h.get("cycle", 0)) for h in history]
    return [cycles.count(c) for c in sorted(set(cycles))]


def mean_displacement(nets: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per group, the mean over nets of :func:`kernel_displacement`'s medians."""
    groups = nets[0]["displacement"] if nets else {}
    return {
        group: {
            name: float(np.mean([n["displacement"][group][name] for n in nets]))
            for name in ("relative", "norm_ratio")
        }
        for group in groups
    }

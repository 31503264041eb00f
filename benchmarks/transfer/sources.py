"""Stage 2: the source networks, whose cycles' final weights are the kernel sets."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from unet3d.train import TrainConfig, train

from ..stages import Stage, digest
from .config import SOURCE, Preset, log
from .data import Data
from .keys import stage_key

#: The stage's folder ``source-<hash>/`` is finished when ``sources.json`` exists.
SOURCE_STAGE = Stage(SOURCE, "sources.json", files=("best", "kernel_sets"))


def train_config(preset: Preset, **changes: Any) -> TrainConfig:
    """The training settings shared by the source nets and the target runs."""
    return TrainConfig(
        widths=preset.widths,
        size=preset.crop,
        lr=preset.lr,
        min_lr=preset.min_lr,
        binarise=True,
        progress=False,
        device=preset.device,
        amp=preset.amp,
        **changes,
    )


def train_sources(preset: Preset, data: Data, work: Path, seed: int) -> dict[str, Any]:
    """Stage 2: train the source U-Nets; returns the kernel-set checkpoints and their scores."""
    key = stage_key(preset, SOURCE, seed, data.key)
    folder, cached = SOURCE_STAGE.open(work, key)
    if cached is not None:
        return cached
    started = time.perf_counter()
    nets = []
    for k in range(preset.source_nets):
        log(f"source net {k + 1}/{preset.source_nets} -> {folder / f'net{k}'}")
        config = train_config(
            preset,
            strategy="random_init",
            out_dir=folder / f"net{k}",
            epochs=preset.source_epochs,
            restarts=preset.source_restarts,
            lr_patience=preset.source_patience,
            seed=seed * 1000 + k,
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
                "val_dice": best.get("val_dice"),
                "epochs": len(result.history),
            }
        )
    summary = {
        "key": digest(key),
        "nets": nets,
        "seconds": time.perf_counter() - started,
    }
    return SOURCE_STAGE.finish(folder, summary)

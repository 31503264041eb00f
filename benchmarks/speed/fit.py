"""The ``fit`` section: wall time of ``dwp.fit_kernel_vae`` with its default settings.

A single, unrepeated measurement (a full fit takes about a minute), so it has no IQR: the
load of other processes during the fit is its noise flag.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

import dwp
from unet3d import UNet3D, count_kernels, kernel3_layers

from ..report import markdown_table
from .kl import default_vae_text
from .machine import OtherLoad, is_busy
from .settings import FIT_SOURCES, FIT_TARGET_S
from .timing import gc_paused, met_cell

__all__ = ["fit_kernels", "render_fit", "run_fit"]


def fit_kernels(seed: int, widths: Sequence[int], n: int) -> Tensor:
    """The first ``n`` 3x3x3 kernels of He-initialised UNet3Ds (as many as needed)."""
    torch.manual_seed(seed)
    per_net = count_kernels(UNet3D(widths=widths))
    nets = [UNet3D(widths=widths) for _ in range(max(FIT_SOURCES, -(-n // per_net)))]
    bank = dwp.collect_kernels(nets, group_by="all", include=kernel3_layers(nets[0]))
    if len(bank) < n:
        raise RuntimeError(f"collected {len(bank)} kernels, need {n}")
    return bank.kernels[:n]


def run_fit(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Time one VAE fit; rows, config and table."""
    kernels = fit_kernels(args.seed, args.widths, args.fit_kernels)
    # Early stopping must not end the run: patience beyond the budget, an unreachable
    # learning-rate floor (ReduceLROnPlateau only ever multiplies by 0.1).
    options = {
        "epochs": args.fit_epochs,
        "early_stopping": args.fit_epochs + 1,
        "min_lr": 0.0,
        "progress": False,
        "seed": args.seed,
    }
    with gc_paused(), OtherLoad().measure() as load:
        start = time.perf_counter()
        fit = dwp.fit_kernel_vae(kernels, **options)
        wall = time.perf_counter() - start
    epochs = len(fit.history)
    row = {
        "section": "fit",
        "variant": "fit_kernel_vae_mlp",
        "kernels": len(kernels),
        "n_train": fit.n_train,
        "n_val": fit.n_val,
        "epochs_requested": args.fit_epochs,
        "epochs_run": epochs,
        "stopped": fit.stopped,
        "reps": 1,
        "median_s": wall,
        "iqr_s": None,
        "s_per_epoch": wall / max(epochs, 1),
        "baseline": "target",
        "ratio": wall / FIT_TARGET_S,
        "target_s": FIT_TARGET_S,
        "target_ratio": 1.0,
        "met": wall < FIT_TARGET_S,
        "noisy": is_busy(load.cores),
        "other_processes_cores": load.cores,
        "best_val_elbo": fit.best_val_elbo,
        "final_lr": fit.history[-1]["lr"] if fit.history else None,
        "times_s": [wall],
    }
    config = {
        "call": "dwp.fit_kernel_vae(kernels, epochs=E, early_stopping=E + 1, min_lr=0.0, "
        "progress=False, seed=SEED); all other settings default (mlp, "
        f"{default_vae_text()}, batch 256, Adam lr 1e-3, val_fraction 0.1)",
        "options": options,
        "kernels": len(kernels),
        "kernel_source": f"first {len(kernels)} 3x3x3 kernels of He-initialised "
        f"UNet3D(widths={tuple(args.widths)}) models (random init: the fit's cost does "
        "not depend on the kernels' values)",
        "timing": "one run, wall clock (includes the held-out ELBO per epoch and the "
        "Gaussian baselines at the end)",
        "target_s": FIT_TARGET_S,
    }
    return [row], config, render_fit([row])


def render_fit(rows: Sequence[dict[str, Any]]) -> str:
    """The fit's table (one row per fit)."""
    return markdown_table(
        ["variant", "kernels", "epochs run", "wall (s)", "s / epoch", "target", "met?", "stopped"],
        [
            [
                r["variant"],
                f"{r['kernels']:,}",
                f"{r['epochs_run']} / {r['epochs_requested']}",
                f"{r['median_s']:.1f}",
                f"{r['s_per_epoch']:.2f}",
                f"< {r['target_s']:.0f} s",
                met_cell(r),
                r["stopped"],
            ]
            for r in rows
        ],
    )

"""The benchmark's three figures: BagNet local age maps, Hydranet learning curves and the
importance maps beside the ground-truth ageing map, each written atomically as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import regression3d as r3d
from dwp.io import atomic_write

from .cohort import Cohort
from .config import METHODS, RECEPTIVE_FIELDS

__all__ = ["plot_hydranet", "plot_importance", "plot_local_maps"]


def _save_figure(fig: Any, path: Path) -> None:
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")


def plot_local_maps(test: Cohort, bag: dict[str, Any], path: Path) -> None:
    """Youngest and oldest test subject: mid axial slice and age maps per receptive field."""
    # matplotlib is imported on use: importing the package should not pay for it
    from matplotlib.figure import Figure

    ages = test.targets["age"]
    rows = [int(np.argmin(ages)), int(np.argmax(ages))]
    fig = Figure(figsize=(2.2 * (1 + len(RECEPTIVE_FIELDS)), 4.6))
    axes = fig.subplots(2, 1 + len(RECEPTIVE_FIELDS))
    z = test.x.shape[-1] // 2
    for r, i in enumerate(rows):
        axes[r, 0].imshow(test.x[i, 0, :, :, z].numpy().T, cmap="gray", origin="lower")
        axes[r, 0].set_title(f"age {ages[i]:.0f}", fontsize=9)
        for c, rf in enumerate(RECEPTIVE_FIELDS, start=1):
            local = bag["local_maps"][rf][i]
            up = r3d.upsample_to_input(local, 8, tuple(test.x.shape[2:]), test.affine)
            axes[r, c].imshow(test.x[i, 0, :, :, z].numpy().T, cmap="gray", origin="lower")
            im = axes[r, c].imshow(up[:, :, z].T, cmap="magma", origin="lower", alpha=0.6)
            axes[r, c].set_title(f"RF {rf}: mean {local.mean():.0f}", fontsize=9)
            fig.colorbar(im, ax=axes[r, c], fraction=0.046, pad=0.02)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle("BagNet local age predictions (years), youngest and oldest test subject")
    _save_figure(fig, path)


def plot_hydranet(rows: list[dict[str, Any]], path: Path) -> None:
    """Test MSE and ICC against training size, per method and target (mean +- sd)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6.5))
    axes = fig.subplots(2, 2)
    for r, target in enumerate(("count", "volume_mm3")):
        for c, metric in enumerate(("mse", "icc")):
            ax = axes[r, c]
            for method in METHODS:
                sel = [x for x in rows if x["method"] == method and x["target"] == target]
                sizes = sorted({x["n_train"] for x in sel})
                values = [[x[metric] for x in sel if x["n_train"] == n] for n in sizes]
                ax.errorbar(
                    sizes, [np.mean(v) for v in values], yerr=[np.std(v) for v in values],
                    marker="o", capsize=3, label=method,
                )  # fmt: skip
            ax.set_xlabel("training subjects")
            ax.set_ylabel(f"{target} {metric.upper()}")
            if metric == "mse":
                ax.set_yscale("log")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("lesion_count: Hydranet vs base regressor (mean +- sd over seeds)")
    fig.tight_layout()
    _save_figure(fig, path)


def plot_importance(test: Cohort, imp: dict[str, Any], path: Path) -> None:
    """Mid axial slices: mean test image, ageing map, noise-model and BagNet importance."""
    from matplotlib.figure import Figure

    z = test.x.shape[-1] // 2
    panels = [
        ("mean test image", test.x[:, 0, :, :, z].mean(0).numpy(), "gray"),
        ("ageing map (1 ventricles, 2 cortex)", imp["template"][:, :, z], "viridis"),
        (f"noise-model importance (BagNet-{imp['best_rf']})", imp["population"][:, :, z], "magma"),
    ] + [(f"BagNet-{rf} |r(local, age)|", m[:, :, z], "magma") for rf, m in imp["bag_maps"].items()]
    fig = Figure(figsize=(2.6 * len(panels), 3.2))
    axes = fig.subplots(1, len(panels))
    for ax, (title, image, cmap) in zip(axes, panels, strict=True):
        im = ax.imshow(np.asarray(image).T, cmap=cmap, origin="lower")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    _save_figure(fig, path)

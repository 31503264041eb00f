"""The report: what each optimiser path learned (scales, ELBO, Dice, uncertainty), the
baselines without a learned posterior, and what a step costs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..report import markdown_table
from .config import PATHS, Preset
from .pipeline import by_cell
from .timing import STEP_TARGET

__all__ = ["render", "summarise"]

PRIOR_LABELS = {"normal_prior": "N(0, 1)", "dwp": "DWP", "pretrained": "none (PR)"}
#: The voxel uncertainty scores reported, from :func:`unet3d.metrics.voxel_uncertainty`.
UNCERTAINTY = ("ece_roi", "nll_roi", "brier_roi", "auroc_mi_roi", "auroc_entropy_roi", "ece_all")


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _sd(values: Sequence[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def summarise(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, path): means over splits (and Dice's standard deviation)."""
    rows = []
    for (method, path), cell in by_cell(records).items():
        row: dict[str, Any] = {"method": method, "path": path, "splits": len(cell)}
        for key in (
            "log_sigma_change",
            "moved_fraction",
            "log_sigma_start",
            "log_sigma_mean",
            "log_sigma_q05",
            "log_sigma_q95",
            "neg_elbo",
            "kl",
            "data_term",
            "train_seconds",
            "dice",
            "iou",
        ):
            if key in cell[0]:
                row[key] = _mean([r[key] for r in cell])
        row["dice_sd"] = _sd([r["dice"] for r in cell])
        for source in cell[0]["uncertainty"]:
            for key in UNCERTAINTY:
                row[f"{source}_{key}"] = _mean([r["uncertainty"][source][key] for r in cell])
        rows.append(row)
    return rows


def _f(value: Any, digits: int = 3, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _dice(row: Mapping[str, Any]) -> str:
    sd = row.get("dice_sd")
    return _f(row["dice"]) + (f" ({sd:.3f})" if sd is not None else "")


def render(
    summary: Sequence[Mapping[str, Any]],
    timing: Sequence[Mapping[str, Any]],
    preset: Preset,
    meta: Mapping[str, Any],
) -> str:
    """The Markdown report."""
    n = max((r["splits"] for r in summary), default=0)
    parts = [
        f"Variational U-Net (paper widths) on the transfer benchmark's `{preset.transfer}` "
        f"setting, {preset.size} target training volumes, {n} split(s); KL weight "
        f"{preset.beta:g}, posterior means from the source network. Means over splits "
        f"(Dice: mean (sd)). Uncertainty per voxel inside the region around the label and "
        f"the prediction (`_roi`, see `unet3d.metrics.uncertainty_region`), "
        f"{preset.eval_samples} posterior samples per test volume; AUROC: wrong voxels "
        "ranked above right ones by the mutual information (MI) or the predictive entropy.",
        "",
        "**What each optimiser path learned**",
        "",
    ]
    headers = [
        "prior",
        "optimiser path",
        "mean abs change of log sigma",
        "moved > 0.5",
        "log sigma: start -> end [5 %, 95 %]",
        "-ELBO (train)",
        "KL",
        "test Dice",
        "ECE",
        "NLL",
        "Brier",
        "AUROC MI",
        "AUROC entropy",
    ]
    rows = []
    for row in summary:
        if row["method"] == "pretrained":
            continue
        rows.append(
            [
                PRIOR_LABELS[row["method"]],
                PATHS[row["path"]].label,
                _f(row["log_sigma_change"]),
                f"{100 * row['moved_fraction']:.0f} %",
                f"{row['log_sigma_start']:.2f} -> {row['log_sigma_mean']:.2f} "
                f"[{row['log_sigma_q05']:.2f}, {row['log_sigma_q95']:.2f}]",
                f"{row['neg_elbo']:,.0f}",
                f"{row['kl']:,.0f}",
                _dice(row),
                _f(row["model_ece_roi"], 4),
                _f(row["model_nll_roi"]),
                _f(row["model_brier_roi"]),
                _f(row["model_auroc_mi_roi"]),
                _f(row["model_auroc_entropy_roi"]),
            ]
        )
    parts += [markdown_table(headers, rows), ""]
    baseline = next((r for r in summary if r["method"] == "pretrained"), None)
    if baseline is not None:
        parts += [
            "**Uncertainty without a learned posterior** (the fine-tuned network, PR)",
            "",
            markdown_table(
                ["uncertainty", "test Dice", "ECE", "NLL", "Brier", "AUROC MI", "AUROC entropy"],
                [
                    [
                        "softmax entropy (one pass)",
                        _dice(baseline),
                        _f(baseline["model_ece_roi"], 4),
                        _f(baseline["model_nll_roi"]),
                        _f(baseline["model_brier_roi"]),
                        "-",
                        _f(baseline["model_auroc_entropy_roi"]),
                    ],
                    [
                        "test-time augmentation (8 flips)",
                        "-",
                        _f(baseline["tta_ece_roi"], 4),
                        _f(baseline["tta_nll_roi"]),
                        _f(baseline["tta_brier_roi"]),
                        _f(baseline["tta_auroc_mi_roi"]),
                        _f(baseline["tta_auroc_entropy_roi"]),
                    ],
                ],
            ),
            "",
        ]
    if timing:
        # rows from before --device / --amp were timed on the CPU in float32
        where = timing[0].get("device", "cpu")
        if timing[0].get("amp", "off") != "off":
            where += f", {timing[0]['amp']} mixed precision"
        parts += [
            f"**Cost**: one training step (forward, ELBO, backward, optimiser step) at "
            f"{timing[0]['input_shape']} on {where}, medians of {timing[0]['reps']} "
            "interleaved rounds",
            "",
            markdown_table(
                [
                    "optimiser path",
                    "median step (s)",
                    "IQR (s)",
                    "ratio vs plain Adam",
                    "target",
                    "met?",
                ],
                [
                    [
                        PATHS[r["path"]].label if r["path"] in PATHS else r["path"],
                        f"{r['median_s']:.3f}",
                        f"{r['iqr_s']:.3f}",
                        f"{r['ratio']:.2f}x",
                        f"<= {STEP_TARGET}x",
                        "yes" if r["met"] else "NO",
                    ]
                    for r in timing
                ],
            ),
            "",
        ]
    parts.append(
        f"Wall time {meta['wall_seconds'] / 60:.1f} min, {meta['jobs']} job(s), "
        f"{meta['threads']} torch thread(s)."
    )
    return "\n".join(parts)

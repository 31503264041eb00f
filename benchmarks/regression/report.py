"""The benchmark's Markdown report: one table per section, with the notes a reader needs
to interpret it; the tables are drawn by the shared :func:`benchmarks.report.markdown_table`."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..report import markdown_table
from .config import METHODS

__all__ = ["render_markdown"]


def _f(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_markdown(
    preset_name: str, bag: dict[str, Any], hydra: list[dict[str, Any]], prior_info: dict[str, Any],
    imp: dict[str, Any], wall: float,
) -> str:  # fmt: skip
    """The report's body; :func:`benchmarks.report.write_results` adds title and command."""
    rows = bag["rows"]
    parts = [
        f"Preset `{preset_name}`, wall time {wall / 60:.1f} min.",
        "## (a) BagNet receptive field: age and sex on `brain_age`",
        markdown_table(
            [
                "receptive field",
                "age MAE (years)",
                "age MAE, bias-corrected",
                "age r",
                "sex accuracy (%)",
                "paper age MAE",
                "paper sex accuracy (%)",
            ],
            [
                [
                    r["receptive_field"],
                    _f(r["age_mae"]),
                    _f(r["age_mae_corrected"]),
                    _f(r["age_r"]),
                    _f(100 * r["sex_accuracy"], 1),
                    _f(r["paper_age_mae"]),
                    _f(100 * r["paper_sex_accuracy"], 1),
                ]
                for r in rows
            ]
            + [
                [
                    "predict the training mean / majority sex",
                    _f(bag["baseline"]["age_mae"]),
                    "-",
                    "-",
                    _f(100 * bag["baseline"]["sex_accuracy"], 1),
                    "-",
                    "-",
                ]
            ],
        ),
        "Bias correction: `pred - (a - 1) age - b` with `pred = a age + b` fitted on the "
        "training subjects only. Paper columns: Pawlowski & Glocker 2019 on CamCAN (652 "
        "real T1 scans, 1 mm), for the layout only.",
        "## (b) Hydranet vs base regressor on `lesion_count` (mean +- sd over seeds)",
    ]
    table = []
    for target in ("count", "volume_mm3"):
        for n in sorted({x["n_train"] for x in hydra}):
            for method in METHODS:
                sel = [
                    x
                    for x in hydra
                    if x["method"] == method and x["target"] == target and x["n_train"] == n
                ]
                mse_v, icc_v = [x["mse"] for x in sel], [x["icc"] for x in sel]
                table.append(
                    [
                        target,
                        n,
                        method,
                        f"{np.mean(mse_v):.4g} +- {np.std(mse_v):.2g}",
                        f"{np.mean(icc_v):.2f} +- {np.std(icc_v):.2f}",
                        _f(np.mean([x["epistemic_sd"] for x in sel]), 3),
                    ]
                )
    parts.append(
        markdown_table(
            ["target", "training subjects", "method", "test MSE", "ICC(2,1)", "epistemic sd"], table
        )
    )
    parts.append(
        f"ICC(2,1): two-way random, absolute agreement (Shrout & Fleiss). One network predicts "
        f"both targets. DWP: one kernel VAE on {prior_info['kernels']} 3x3x3 kernels of "
        f"regressors trained on `ms_source`; on its test kernels {prior_info['vae_test_iwae']:.1f} "
        f"nats per kernel vs {prior_info['gaussian_full']:.1f} (full-covariance Gaussian) and "
        f"{prior_info['gaussian_diagonal']:.1f} (diagonal)."
    )
    parts.append("## (c) Importance maps vs the ground-truth ageing map (AUC inside the brain)")
    parts.append(
        markdown_table(
            [
                "method",
                "AUC population map",
                "AUC ventricles",
                "AUC cortex",
                "AUC per subject (mean)",
            ],
            [
                [
                    x["method"],
                    _f(x["auc_population"], 3),
                    _f(x["auc_ventricles"], 3),
                    _f(x["auc_cortex"], 3),
                    _f(x["auc_subject_mean"], 3),
                ]
                for x in imp["rows"]
            ],
        )
    )
    return "\n\n".join(parts)

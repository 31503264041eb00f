"""The benchmark's Markdown report: one table per section, with the notes a reader needs
to interpret it; the tables are drawn by the shared :func:`benchmarks.report.markdown_table`."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..report import markdown_table
from .config import METHODS, PRESETS

__all__ = ["ABLATIONS_HEADING", "keep_ablations", "mean_ci", "mean_ci_text", "render_markdown"]

#: the section of ``regression.md`` measured outside the runs (Hydranet's ablations, by
#: hand): :func:`keep_ablations` carries it over when the report is rewritten
ABLATIONS_HEADING = "## (d) Hydranet ablations"


def _f(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval over seeds (``(mean, mean, mean)`` for one)."""
    from scipy import stats

    array = np.asarray(values, dtype=float)
    mean = float(array.mean())
    if len(array) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + level / 2, len(array) - 1) * stats.sem(array))
    return mean, mean - half, mean + half


def mean_ci_text(values: list[float], fmt: str = ".2f") -> str:
    """``mean [low, high]`` of :func:`mean_ci` (the value alone for one seed: no
    interval)."""
    mean, low, high = mean_ci(values)
    if len(values) < 2:
        return f"{mean:{fmt}}"
    return f"{mean:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def keep_ablations(old: str | None, new: str) -> str:
    """``new`` with the :data:`ABLATIONS_HEADING` section of the previous report ``old``
    appended (from the heading to the report's "Produced by" footer or its end)."""
    if old is None or ABLATIONS_HEADING not in old:
        return new
    section = old[old.index(ABLATIONS_HEADING) :].split("\nProduced by:\n")[0]
    return new.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"


def render_markdown(
    preset_name: str, bag: dict[str, Any], hydra: list[dict[str, Any]], prior_info: dict[str, Any],
    imp: dict[str, Any], wall: float,
) -> str:  # fmt: skip
    """The report's body; :func:`benchmarks.report.write_results` adds title and command."""
    preset = PRESETS[preset_name]
    hydra_sets, batch = preset.hydranet_sets_per_step, preset.batch_size
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
        "## (b) Hydranet vs base regressor on `lesion_count` (mean [95% CI] over seeds)",
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
                if not sel:  # a method not run at this size (``Preset.bayesian_sizes``)
                    continue
                mse_v, icc_v = [x["mse"] for x in sel], [x["icc"] for x in sel]
                # paired by seed (the same training subjects): method minus base
                base = {
                    x["seed"]: x["icc"]
                    for x in hydra
                    if x["method"] == "base" and x["target"] == target and x["n_train"] == n
                }
                diff = [x["icc"] - base[x["seed"]] for x in sel if x["seed"] in base]
                table.append(
                    [
                        target,
                        n,
                        method,
                        len(sel),
                        mean_ci_text(mse_v, ".4g"),
                        mean_ci_text(icc_v),
                        "-" if method == "base" else mean_ci_text(diff),
                        mean_ci_text([x["train_icc"] for x in sel]),
                        mean_ci_text([x["icc_paper_inference"] for x in sel])
                        if method == "hydranet"
                        else "-",
                        _f(np.mean([x["epistemic_sd"] for x in sel]), 3),
                    ]
                )
    parts.append(
        markdown_table(
            [
                "target",
                "training subjects",
                "method",
                "seeds",
                "test MSE",
                "ICC(2,1)",
                "ICC minus base (paired)",
                "train ICC",
                "ICC, f(x) + 3 f(0)",
                "epistemic sd",
            ],
            table,
        )
    )
    parts.append(
        f"ICC(2,1): two-way random, absolute agreement (Shrout & Fleiss); 95% Student-t "
        f"intervals over seeds (each seed its own training subjects, the same for every "
        f"method). One network predicts both targets; images scaled to a zero background, "
        f"`feature_scale` 100; Hydranet as in the paper (sets of 4, p = 0.1, label sums not "
        f"centred, the paper's epochs: {hydra_sets} sets per step where the base takes "
        f"{batch} images); it predicts f(x) alone, the paper f(x) + 3 f(0) (its other "
        f"branches fed zero images). Train ICC: on the run's own training subjects. DWP: one kernel VAE on {prior_info['kernels']} 3x3x3 kernels of "
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

"""The report: paper-format tables (Dice and IoU, mean (std) over splits), paired
differences DWP minus each baseline with a paired t-test across splits, the per-voxel
uncertainty quality, the settings chosen on validation, the source and prior
diagnostics, and Dice against train size."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dwp.io import atomic_write

from ..report import markdown_table, write_results
from .cells import finite_means
from .config import LABELS, Preset
from .execution import Plan


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample std (``None`` from a single value: no spread to report)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else None


def summarise(records: Sequence[Mapping[str, Any]], preset: Preset) -> dict[str, Any]:
    """Per (method, size): mean and std over splits of the test Dice and IoU; paired
    differences DWP minus each baseline across splits with a paired t-test."""
    from scipy import stats

    by = {(r["method"], r["size"], r["split"]): r for r in records}
    table = {}
    for (method, size, _), _r in by.items():
        if (method, size) in table:
            continue
        splits = sorted(s for m, n, s in by if m == method and n == size)
        dice = [by[method, size, s]["dice"] for s in splits]
        iou = [by[method, size, s]["iou"] for s in splits]
        table[method, size] = {"dice": _mean_std(dice), "iou": _mean_std(iou), "n": len(splits)}
    paired = []
    for baseline in [m for m in preset.methods if m != "dwp"]:
        for size in preset.sizes:
            splits = [
                s
                for s in range(preset.splits)
                if ("dwp", size, s) in by and (baseline, size, s) in by
            ]
            if not splits:
                continue
            a = np.array([by["dwp", size, s]["dice"] for s in splits])
            b = np.array([by[baseline, size, s]["dice"] for s in splits])
            diff = a - b
            p = float(stats.ttest_rel(a, b).pvalue) if len(splits) > 1 and diff.std() > 0 else None
            paired.append(
                {
                    "baseline": baseline,
                    "size": size,
                    "n_splits": len(splits),
                    "mean_diff": float(diff.mean()),
                    "std_diff": float(diff.std(ddof=1)) if len(splits) > 1 else None,
                    "p_value": p,
                }
            )
    return {"table": table, "paired": paired, "uncertainty": summarise_uncertainty(records)}


#: The uncertainty table's columns: a key of ``record["uncertainty"][variant]`` and its
#: header.  Inside the uncertainty region (``_roi``) but for one whole-volume ECE, which
#: shows what the easy background does to it.
UNCERTAINTY_COLUMNS = {
    "nll_roi": "NLL",
    "brier_roi": "Brier",
    "ece_roi": "ECE",
    "ece_all": "ECE (whole volume)",
    "auroc_mi_roi": "AUROC MI",
    "auroc_entropy_roi": "AUROC entropy",
}


def summarise_uncertainty(
    records: Sequence[Mapping[str, Any]],
) -> dict[tuple[str, int, str], dict[str, float]]:
    """Per (method, size, variant): the mean over splits of each per-voxel uncertainty
    score (``record["uncertainty"][variant]``: ``"model"`` the method's own prediction,
    ``"tta"`` with test-time augmentation) and ``n`` the splits.  Records without
    uncertainty scores (runs cached before they were computed) are left out."""
    grouped: dict[tuple[str, int, str], list[Mapping[str, float]]] = {}
    for r in records:
        for variant, scores in (r.get("uncertainty") or {}).items():
            grouped.setdefault((r["method"], r["size"], variant), []).append(scores)
    return {key: {**finite_means(rows), "n": len(rows)} for key, rows in grouped.items()}


def _uncertainty_table(summary: Mapping[str, Any], preset: Preset) -> str | None:
    """The Markdown table of :func:`summarise_uncertainty`, or None without scores."""
    table = summary.get("uncertainty") or {}
    if not table:
        return None

    def cell(scores: Mapping[str, float], key: str) -> str:
        value = scores.get(key, math.nan)
        one_pass = key.startswith("auroc_mi") and scores["passes"] == 1  # MI is 0: chance
        return "-" if one_pass or not math.isfinite(value) else f"{value:.3f}"

    rows = [
        [
            LABELS[m] + (" + TTA" if variant == "tta" else ""),
            n,
            f"{table[m, n, variant]['passes']:g}",
            *(cell(table[m, n, variant], key) for key in UNCERTAINTY_COLUMNS),
        ]
        for m in preset.methods
        for variant in ("model", "tta")
        for n in preset.sizes
        if (m, n, variant) in table
    ]
    return (
        "**Uncertainty** per test voxel, mean over the test volumes, then over splits: "
        "the negative log-likelihood (nats), Brier score and ECE (15 bins) of the "
        "probabilities, and the AUROC of finding the wrong voxels by their mutual "
        "information (MI) or predictive entropy.  Scored inside each volume's uncertainty "
        "region (the label's and the prediction's foreground grown by "
        "`unet3d.metrics.ROI_MARGIN` voxels; it holds every wrong voxel), where the easy "
        "background does not drown the rest, as it does the whole-volume ECE.  Passes: "
        "posterior samples of a Bayesian net, 1 for a deterministic net (its softmax "
        "entropy; no MI), the mirror images of test-time augmentation (+ TTA).\n\n"
        + markdown_table(["method", "train size", "passes", *UNCERTAINTY_COLUMNS.values()], rows)
    )


def _fmt(mean_std: tuple[float, float | None]) -> str:
    mean, std = mean_std
    return f"{mean:.2f} (-)" if std is None else f"{mean:.2f} ({std:.2f})"


def render(summary: Mapping[str, Any], plan_info: Mapping[str, Any], preset: Preset) -> str:
    """The Markdown report: paper-format tables, paired differences, diagnostics."""
    table = summary["table"]
    methods = [m for m in preset.methods if any(k[0] == m for k in table)]
    parts = []
    for metric, title in (("dice", "Dice"), ("iou", "IoU")):
        rows = [
            [n, *(_fmt(table[m, n][metric]) if (m, n) in table else "-" for m in methods)]
            for n in preset.sizes
        ]
        parts.append(
            f"**{title}** on {preset.n_test} test volumes, mean (std) over splits:\n\n"
            + markdown_table(["train size", *(LABELS[m] for m in methods)], rows)
        )
    if summary["paired"]:
        rows = [
            [
                f"DWP - {LABELS[p['baseline']]}",
                p["size"],
                f"{p['mean_diff']:+.3f} ("
                + ("-" if p["std_diff"] is None else f"{p['std_diff']:.3f}")
                + ")",
                "-" if p["p_value"] is None else f"{p['p_value']:.3f}",
            ]
            for p in summary["paired"]
        ]
        parts.append(
            "Paired Dice differences across splits (same training subsets), paired t-test:\n\n"
            + markdown_table(["difference", "train size", "mean (std)", "p"], rows)
        )
    uncertainty = _uncertainty_table(summary, preset)
    if uncertainty:
        parts.append(uncertainty)
    for sel in plan_info.get("selections") or []:
        names = list(sel["chosen"])
        rows = [
            [
                *(_setting(c[n]) for n in names),
                f"{c['val_dice']:.3f}",
                "chosen" if all(c[n] == sel["chosen"][n] for n in names) else "",
            ]
            for c in sel["candidates"]
        ]
        parts.append(
            f"{LABELS[sel['method']]}: settings chosen on the validation Dice of "
            f"n={sel['size']}, split {sel['split']} (never the test set):\n\n"
            + markdown_table([*names, "validation Dice", ""], rows)
        )
    diag = plan_info.get("diagnostics")
    if diag:
        parts.append(diag)
    return "\n\n".join(parts)


def _setting(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def diagnostics(plan: Plan) -> str:
    """Source quality and prior fit: what to look at when DWP does not win."""
    lines = []
    if plan.sources:
        dice = [n["val_dice"] for n in plan.sources["nets"] if n["val_dice"] is not None]
        sets = sum(len(n["kernel_sets"]) for n in plan.sources["nets"])
        if dice:
            lines.append(
                f"Source: {len(plan.sources['nets'])} U-Net(s), {sets} kernel sets, "
                f"validation Dice {', '.join(f'{d:.3f}' for d in dice)}."
            )
    if plan.prior:
        lines.append(_prior_fit(plan.prior["fit"]))
    return "\n\n".join(lines)


def _prior_fit(fit: Mapping[str, Mapping[str, Any]]) -> str:
    """The prior stage's held-out fit per group (``prior.json``'s ``fit``), as a table."""
    rows = [
        [g, f["test_kernels"], f"{f['vae']:.2f}", f"{f['kernel_gaussian']:.2f}",
         f"{f['diagonal_gaussian']:.2f}"]
        for g, f in fit.items()
        if f
    ]  # fmt: skip
    return (
        "Kernel VAEs against Gaussians fitted to the same training kernels: log density "
        "of each group's test kernels (used for no choice of the fit), nats per kernel, "
        "higher is better; the VAE's is its importance-weighted bound (K=64):\n\n"
        + markdown_table(
            ["group", "test kernels", "VAE", "full-cov Gaussian", "diagonal Gaussian"], rows
        )
    )


def plot(summary: Mapping[str, Any], preset: Preset, path: Path) -> None:
    """Dice against train size, one line per method, error bars = std over splits."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 4))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for offset, method in enumerate(preset.methods):
        points = [
            (n, *summary["table"][method, n]["dice"])
            for n in preset.sizes
            if (method, n) in summary["table"]
        ]
        if not points:
            continue
        n, mean, std = (np.array(v, dtype=float) for v in zip(*points, strict=True))
        ax.errorbar(
            n + 0.15 * (offset - 2), mean, yerr=std, marker="o", capsize=3, label=LABELS[method]
        )
    ax.set_xlabel("target training volumes")
    ax.set_ylabel(f"test Dice ({preset.n_test} volumes)")
    ax.set_xticks(list(preset.sizes))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    figure.tight_layout()
    with atomic_write(path) as f:
        figure.savefig(f, format="png", dpi=120)


def write_report(plan: Plan, out: Path, name: str, command: str | None = None) -> tuple[Path, Path]:
    """Write ``<name>.md``, ``<name>.json`` (config and every run's record) and ``<name>.png``."""
    records = plan.records
    summary = summarise(records, plan.preset)
    info = {"diagnostics": diagnostics(plan), "selections": plan.selections}
    text = render(summary, info, plan.preset)
    config = {
        "preset": dataclasses.asdict(plan.preset),
        "seed": plan.seed,
        "data": plan.data_key,
        "subjects": plan.subjects,
        "selections": plan.selections,
        "execution": plan.execution,
        "sources": plan.sources,
        "prior": plan.prior,
        "wall_seconds": plan.wall_seconds,
        "summary": {
            "table": [
                {"method": m, "size": n, **v} for (m, n), v in sorted(summary["table"].items())
            ],
            "paired": summary["paired"],
            "uncertainty": [
                {
                    "method": m,
                    "size": n,
                    "variant": variant,
                    **{k: v if math.isfinite(v) else None for k, v in scores.items()},
                }
                for (m, n, variant), scores in sorted(summary["uncertainty"].items())
            ],
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    try:
        plot(summary, plan.preset, out / f"{name}.png")
        text += f"\n\n![Dice against train size]({name}.png)"
    except ImportError:
        pass
    return write_results(name, config, records, text, out, command=command)

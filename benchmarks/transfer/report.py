"""The report of both regimes: the answer (which method beats tuned fine-tuning, where, by
how much), then per regime the test metrics of every method with confidence intervals,
the paired differences with their bootstrap intervals and minimum detectable differences,
the per-voxel uncertainty quality, the posterior diagnostics and the settings chosen on
validation; then the source nets (how far their kernels moved) and the priors' held-out
fit; and Dice against train size."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dwp.io import atomic_write

from ..report import markdown_table, write_results
from .config import DESCRIPTIONS, LABELS, REGIMES, Preset
from .execution import Plan
from .selection import budget
from .summary import METRICS, REFERENCE, summarise

#: What each regime models, for the report and the README.
REGIME_TEXT = {
    "near": "near transfer: the target (tumour_target, T2-like, a bright lesion) shares "
    "the source's contrast logic; the source's weights should transfer",
    "far": "far transfer: the same tumours on a T1-like contrast (tumour_t1) in which they "
    "are dark; the source's bright-lesion features do not fit (as in Kuzina et al., where "
    "fine-tuning was no better than random init)",
}
METRIC_HEADERS = {
    "dice": "Dice",
    "iou": "IoU",
    "hd95": "HD95 (mm)",
    "ece_roi": "ECE",
    "auroc_entropy_roi": "error AUROC",
}
TRAINING_COLUMNS = ("epochs", "best epoch", "at the floor", "val Dice 0", "seconds")


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


def _interval(value: Sequence[float], digits: int = 3) -> str:
    mean, low, high = value
    if not math.isfinite(mean):
        return "-"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _signed(p: Mapping[str, Any]) -> str:
    low, high = p["ci_both"] or (None, None)
    text = f"{p['mean']:+.3f}"
    return text if low is None else f"{text} [{low:+.3f}, {high:+.3f}]"


def _optional(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def answer(summaries: Mapping[str, Mapping[str, Any]], preset: Preset) -> str:
    """One line per regime and train size: how each method compares with tuned
    fine-tuning (the two-way bootstrap interval of the paired Dice difference)."""
    lines = []
    for regime, summary in summaries.items():
        for size in preset.sizes:
            rows = [p for p in summary["paired"]
                    if p["baseline"] == REFERENCE and p["size"] == size]  # fmt: skip
            if not rows:
                continue
            parts = [
                f"{LABELS[p['method']]} {p['verdict'].replace('no detectable difference', 'tie')}"
                f" ({_signed(p)})"
                for p in rows
            ]
            lines.append(
                f"- **{regime}, {size} volumes**, Dice minus tuned fine-tuning: "
                + "; ".join(parts)
                + "."
            )
        ri = [p for p in summary["paired"] if p["baseline"] == "random_init"]
        if ri:
            lines.append(
                f"- {regime}: fine-tuning minus random init "
                + ", ".join(f"{_signed(p)} at {p['size']}" for p in ri)
                + "."
            )
    return "\n".join(lines)


def _metric_tables(summary: Mapping[str, Any], preset: Preset) -> str:
    """Per train size, every method's metrics: mean [95 % t-interval] across splits."""
    table = summary["table"]
    parts = []
    for size in preset.sizes:
        rows = [
            [LABELS[m], table[m, size]["n"], *(_interval(table[m, size][k]) for k in METRICS)]
            for m in preset.methods
            if (m, size) in table
        ]
        if rows:
            parts.append(
                f"{size} training volumes ({preset.n_test} test volumes; mean over splits "
                "[95 % t-interval]):\n\n"
                + markdown_table(["method", "splits", *METRIC_HEADERS.values()], rows)
            )
    return "\n\n".join(parts)


PAIRED_HEADERS = ["difference", "train size", "mean [95 % CI]", "CI across splits", "p", "MDD",
                  "verdict"]  # fmt: skip


def _paired_table(summary: Mapping[str, Any]) -> str:
    rows = [
        [
            f"{LABELS[p['method']]} - {LABELS[p['baseline']]}",
            p["size"],
            _signed(p),
            "-"
            if p["ci_splits"] is None
            else f"[{p['ci_splits'][0]:+.3f}, {p['ci_splits'][1]:+.3f}]",
            _optional(p["p_value"]),
            _optional(p["mdd"]),
            p["verdict"],
        ]
        for p in summary["paired"]
    ]
    return (
        "Paired Dice differences (same training subsets, same test volumes): the mean with "
        "its 95 % interval from the crossed bootstrap over splits and test volumes (the "
        "headline; both sources of noise), the t-interval across splits alone, the paired "
        "t-test's p, and the minimum detectable difference (MDD: the true difference these "
        "splits would detect with 80 % power at p < 0.05).  A verdict needs both intervals "
        "to exclude 0 on one side (over 5 splits the bootstrap alone is too narrow).\n\n"
        + markdown_table(PAIRED_HEADERS, rows)
    )


def _method_size_rows(table: Mapping, preset: Preset, cells: Callable) -> list[list[Any]]:
    """Rows ``[label, train size, *cells(entry)]`` per (method, size), in report order."""
    ms = [(m, n) for m in preset.methods for n in preset.sizes if table.get((m, n))]
    return [[LABELS[m], n, *cells(table[m, n])] for m, n in ms]


def _posterior_table(summary: Mapping[str, Any], preset: Preset) -> str | None:
    rows = _method_size_rows(
        summary.get("posterior") or {},
        preset,
        lambda v: [_optional(v.get("kl_share"), 4), _optional(v.get("sigma_median"), 4),
                   _optional(v.get("snr_median"), 2),
                   _optional(v.get("log_sigma_change_median"), 3)],
    )  # fmt: skip
    if not rows:
        return None
    return (
        "Bayesian runs (means over splits of the best epoch): the KL's share of the "
        "objective (beta KL / (data term + beta KL)), the median posterior sigma, the "
        "median |mean| / sigma, and the median change of log-sigma from its initial "
        "value (0: the scales did not learn).\n\n"
        + markdown_table(
            ["method", "train size", "KL share", "sigma", "|mean| / sigma", "log-sigma change"],
            rows,
        )
    )


def _training_table(summary: Mapping[str, Any], preset: Preset) -> str | None:
    rows = _method_size_rows(
        summary.get("training") or {},
        preset,
        lambda v: [f"{v['epochs_median']:g}", f"{v['best_epoch_median']:g}",
                   f"{v['at_floor']} of {v['n']}", f"{v.get('val_dice_zero', 0)} of {v['n']}",
                   f"{v['train_seconds_median']:.0f}"],
    )  # fmt: skip
    if not rows:
        return None
    budget = (
        f"{preset.steps} optimiser steps per run"
        if preset.steps > 0
        else f"until ReduceLROnPlateau reaches its floor (at most {preset.epochs} epochs)"
    )
    return (
        f"How the runs ended (trained {budget}; medians over splits): the epochs run, the "
        "best validation epoch (the weights scored), the runs stopped because the learning "
        "rate reached its floor (converged), the runs whose scored weights find no lesion "
        "on validation (Dice 0: the all-background trap) and the training time.\n\n"
        + markdown_table(["method", "train size", *TRAINING_COLUMNS], rows)
    )


def _selection_tables(selections: Sequence[Mapping[str, Any]], preset: Preset) -> str:
    parts = []
    runs = budget(preset, preset.methods)
    if runs:
        parts.append(
            "Validation runs per method to choose its settings (the same budget for every "
            "method): " + ", ".join(f"{LABELS[m]} {n}" for m, n in runs.items()) + "."
        )
    for sel in selections:
        names = list(sel["chosen"])
        rows = [
            [
                *(_setting(c[n]) for n in names),
                f"{c['val_dice']:.3f}",
                "chosen" if all(c[n] == sel["chosen"][n] for n in names) else "",
            ]
            for c in sel["candidates"]
        ]
        blind = all(c["val_dice"] == 0 for c in sel["candidates"])  # all trapped: no choice
        parts.append(
            f"{LABELS[sel['method']]}: chosen on the validation Dice of n={sel['size']}, "
            f"split {sel['split']} (never the test set)"
            + (", where every candidate has Dice 0: the first is taken" if blind else "")
            + ":\n\n"
            + markdown_table([*names, "validation Dice", ""], rows)
        )
    return "\n\n".join(parts)


def render_regime(regime: str, summary: Mapping[str, Any], plan: Plan) -> str:
    """One regime's section."""
    preset = plan.preset
    parts = [f"## {regime.capitalize()} transfer\n\n{REGIME_TEXT.get(regime, regime)}."]
    parts.append(_metric_tables(summary, preset))
    if summary["paired"]:
        parts.append(_paired_table(summary))
    uncertainty = _uncertainty_table(summary, preset)
    if uncertainty:
        parts.append(uncertainty)
    posterior = _posterior_table(summary, preset)
    if posterior:
        parts.append(posterior)
    training = _training_table(summary, preset)
    if training:
        parts.append(training)
    parts.append(_selection_tables(plan.selections, preset))
    return "\n\n".join(p for p in parts if p)


def render(summaries: Mapping[str, Mapping[str, Any]], plans: Mapping[str, Plan]) -> str:
    """The Markdown report of every regime."""
    first = next(iter(plans.values()))
    preset = first.preset
    methods = "\n".join(f"- {LABELS[m]}: {DESCRIPTIONS[m]}" for m in preset.methods)
    parts = [
        "## The answer\n\n" + answer(summaries, preset),
        "Methods:\n\n" + methods,
    ]
    parts += [render_regime(r, summaries[r], plans[r]) for r in plans]
    diag = diagnostics(first)
    if diag:
        parts.append("## Source nets and priors\n\n" + diag)
    return "\n\n".join(parts)


def _setting(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def diagnostics(plan: Plan) -> str:
    """Source quality, how far the source kernels moved, and the priors' fit: what to look
    at when a learned prior does not win."""
    lines = []
    if plan.sources:
        nets = plan.sources["nets"]
        dice = [n["val_dice"] for n in nets if n["val_dice"] is not None]
        sets = sum(len(n["kernel_sets"]) for n in nets)
        lines.append(
            f"Source: {len(nets)} U-Net(s), {sets} kernel sets (every cycle's final net), "
            f"validation Dice {', '.join(f'{d:.3f}' for d in dice)}; epochs per cycle "
            + "; ".join(str(n.get("cycle_epochs", n["epochs"])) for n in nets)
            + "."
        )
        moved = plan.sources.get("displacement")
        if moved:
            rows = [[g, f"{v['relative']:.3f}", f"{v['norm_ratio']:.3f}"] for g, v in moved.items()]
            lines.append(
                "How far the source kernels moved from their initialisation, per resolution "
                "group (medians over kernels, means over nets): ||w - w0|| / ||w0|| and "
                "||w|| / ||w0||.\n\n"
                + markdown_table(["group", "relative displacement", "norm ratio"], rows)
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


def plot(summaries: Mapping[str, Mapping[str, Any]], preset: Preset, path: Path) -> None:
    """Dice against train size, one panel per regime, one line per method, error bars the
    95 % t-intervals across splits."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5 * len(summaries), 4))
    FigureCanvasAgg(figure)
    for i, (regime, summary) in enumerate(summaries.items()):
        ax = figure.add_subplot(1, len(summaries), i + 1)
        for offset, method in enumerate(preset.methods):
            points = [
                (n, *summary["table"][method, n]["dice"])
                for n in preset.sizes
                if (method, n) in summary["table"]
            ]
            if not points:
                continue
            n, mean, low, high = (np.array(v, dtype=float) for v in zip(*points, strict=True))
            error = np.nan_to_num(np.stack([mean - low, high - mean]))
            shift = 0.12 * (offset - (len(preset.methods) - 1) / 2)
            ax.errorbar(n + shift, mean, yerr=error, marker="o", capsize=3, label=LABELS[method])
        ax.set_title(f"{regime} transfer ({REGIMES.get(regime, regime)})")
        ax.set_xlabel("target training volumes")
        ax.set_ylabel(f"test Dice ({preset.n_test} volumes)")
        ax.set_xticks(list(preset.sizes))
        ax.grid(alpha=0.3)
        if i == 0 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    figure.tight_layout()
    with atomic_write(path) as f:
        figure.savefig(f, format="png", dpi=120)


def _json_table(table: Mapping[tuple, Mapping[str, Any]]) -> list[dict[str, Any]]:
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return [
        {"method": k[0], "size": k[1], **({"variant": k[2]} if len(k) > 2 else {}),
         **{name: plain(v) for name, v in row.items()}}
        for k, row in sorted(table.items())
    ]  # fmt: skip


def write_report(
    plans: Plan | Mapping[str, Plan], out: Path, name: str, command: str | None = None
) -> tuple[Path, Path]:
    """Write ``<name>.md``, ``<name>.json`` (config, every regime's summary and every
    run's record) and ``<name>.png``; ``plans``: one per regime (a single plan is its
    preset's regime)."""
    if isinstance(plans, Plan):
        plans = {plans.preset.regime: plans}
    summaries = {r: summarise(p.records, p.preset) for r, p in plans.items()}
    text = render(summaries, plans)
    first = next(iter(plans.values()))
    config = {
        "preset": dataclasses.asdict(first.preset),
        "seed": first.seed,
        "sources": first.sources,
        "prior": first.prior,
        "regimes": {
            regime: {
                "preset": dataclasses.asdict(plan.preset),  # with its choices
                "data": plan.data_key,
                "subjects": plan.subjects,
                "selections": plan.selections,
                "execution": plan.execution,
                "wall_seconds": plan.wall_seconds,
                "summary": {
                    "table": _json_table(summaries[regime]["table"]),
                    "paired": summaries[regime]["paired"],
                    "posterior": _json_table(summaries[regime]["posterior"]),
                    "uncertainty": _json_table(summaries[regime]["uncertainty"]),
                    "training": _json_table(summaries[regime]["training"]),
                },
            }
            for regime, plan in plans.items()
        },
    }
    records = [{"regime": r, **record} for r, p in plans.items() for record in p.records]
    out.mkdir(parents=True, exist_ok=True)
    try:
        plot(summaries, first.preset, out / f"{name}.png")
        text += f"\n\n![Dice against train size]({name}.png)"
    except ImportError:
        pass
    return write_results(name, config, records, text, out, command=command)

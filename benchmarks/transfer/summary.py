"""The numbers of the report: per method and train size the test metrics with confidence
intervals across splits, and paired differences with bootstrap intervals over test volumes
and splits (:mod:`.statistics`), the minimum detectable difference and the verdict."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .cells import finite_means
from .config import BAYESIAN, Preset
from .statistics import PairedDifference, mean_interval, paired_difference

#: The reference every method is compared with: fine-tuning with a tuned learning rate.
REFERENCE = "pretrained"
#: Per-volume metrics of a run's record (``record["test"]``) and whether higher is better.
METRICS = {
    "dice": True,
    "iou": True,
    "hd95": False,
    "ece_roi": False,
    "auroc_entropy_roi": True,
}


def per_volume(record: Mapping[str, Any], metric: str) -> np.ndarray:
    """``record``'s per-test-volume ``metric`` as floats, infinities as NaN (an HD95 of an
    empty prediction is undefined, not infinitely bad: it is left out, pairwise)."""
    values = np.asarray(record["test"].get(metric, []), dtype=float)
    values[~np.isfinite(values)] = np.nan
    return values


def _cells(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int, int], Mapping[str, Any]]:
    return {(r["method"], r["size"], r["split"]): r for r in records}


def method_table(
    records: Sequence[Mapping[str, Any]], preset: Preset
) -> dict[tuple[str, int], dict[str, Any]]:
    """Per (method, size): for each of :data:`METRICS` the mean over splits of the per-split
    mean over test volumes, with its 95 % t-interval across splits (``(mean, lo, hi)``),
    and ``n`` the splits."""
    by = _cells(records)
    table: dict[tuple[str, int], dict[str, Any]] = {}
    for method in preset.methods:
        for size in preset.sizes:
            runs = [by[method, size, s] for s in range(preset.splits) if (method, size, s) in by]
            if not runs:
                continue
            row: dict[str, Any] = {"n": len(runs)}
            for metric in METRICS:
                means = [np.nanmean(v) if np.isfinite(v).any() else np.nan
                         for v in (per_volume(r, metric) for r in runs)]  # fmt: skip
                row[metric] = mean_interval(np.asarray(means, dtype=float))
            table[method, size] = row
    return table


def comparisons(preset: Preset) -> list[tuple[str, str]]:
    """The paired comparisons ``(method, baseline)``: every method against tuned
    fine-tuning (:data:`REFERENCE`), fine-tuning against random init (does the source
    help at all in this regime?) and each learned prior against the N(0, 1) control (what
    the learned prior adds to a Bayesian net)."""
    methods = set(preset.methods)
    out = [(m, REFERENCE) for m in preset.methods if m != REFERENCE and REFERENCE in methods]
    if {REFERENCE, "random_init"} <= methods:
        out.append((REFERENCE, "random_init"))
    if "normal_prior" in methods:
        out += [(m, "normal_prior") for m in ("dwp", "kernel_gaussian", "swag") if m in methods]
    return out


def paired_table(
    records: Sequence[Mapping[str, Any]], preset: Preset, metric: str = "dice"
) -> list[dict[str, Any]]:
    """Paired ``metric`` differences of :func:`comparisons` at every size, over the splits
    both methods finished: :func:`~.statistics.paired_difference` of the per-volume
    scores (``(splits, test volumes)``), with ``preset.bootstrap`` replicates."""
    by = _cells(records)
    rows = []
    for method, baseline in comparisons(preset):
        for size in preset.sizes:
            splits = [
                s
                for s in range(preset.splits)
                if (method, size, s) in by and (baseline, size, s) in by
            ]
            if not splits:
                continue
            a = np.stack([per_volume(by[method, size, s], metric) for s in splits])
            b = np.stack([per_volume(by[baseline, size, s], metric) for s in splits])
            result = paired_difference(a, b, n_boot=preset.bootstrap, seed=size)
            rows.append(
                {"method": method, "baseline": baseline, "size": size, "metric": metric,
                 **result.as_dict(), "verdict": verdict(result)}
            )  # fmt: skip
    return rows


def verdict(result: PairedDifference) -> str:
    """``"better"`` / ``"worse"`` when both the crossed bootstrap interval and the
    t-interval across splits exclude 0 on the same side, else ``"no detectable
    difference"``.

    Why both: the crossed bootstrap holds the test volumes' noise, which the t-interval
    leaves out, but over 5 splits it is too narrow for the splits' noise, which the
    t-interval gets right: a bootstrap of K values has (K-1)/K of their variance and
    normal-like quantiles where the t has K-1 degrees of freedom (83 to 87 % coverage in
    simulations where the splits' noise dominates).  Alone, the bootstrap called
    differences that the paired t-test put at p 0.1.
    """
    sides = []
    for interval in (result.ci_both, result.ci_splits):
        if interval is None:
            return "no detectable difference"
        low, high = interval
        sides.append("better" if low > 0 else "worse" if high < 0 else None)
    if sides[0] is not None and sides[0] == sides[1]:
        return sides[0]
    return "no detectable difference"


def posterior_table(
    records: Sequence[Mapping[str, Any]], preset: Preset
) -> dict[tuple[str, int], dict[str, float]]:
    """Per Bayesian (method, size): the means over splits of the run's posterior summary
    (:func:`~.cells.posterior_summary`: median sigma, median ``|mean| / sigma``, median
    log-sigma change) and its KL share of the objective."""
    grouped: dict[tuple[str, int], list[Mapping[str, float]]] = {}
    for r in records:
        if r["method"] in BAYESIAN and r.get("posterior"):
            row = {k: (math.nan if v is None else v) for k, v in r["posterior"].items()}
            grouped.setdefault((r["method"], r["size"]), []).append(row)
    return {key: finite_means(rows) for key, rows in grouped.items()}


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


def training_table(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Per (method, size): how its runs ended, the evidence that a preset trains to
    convergence or does not: the median epochs run and best (validation) epoch, the runs
    stopped because the learning rate reached its floor (``min_lr``, converged) out of
    ``n``, the runs whose scored weights have validation Dice 0 (``val_dice_zero``: no
    lesion voxel found, the all-background trap of :mod:`unet3d.losses`) and the median
    training time in seconds.  Records without these fields (runs cached before they
    were kept) are left out."""
    grouped: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for r in records:
        if all(k in r for k in ("epochs", "best_epoch", "stop_reason", "train_seconds")):
            grouped.setdefault((r["method"], r["size"]), []).append(r)
    return {
        key: {
            "n": len(rows),
            "epochs_median": float(np.median([r["epochs"] for r in rows])),
            "best_epoch_median": float(np.median([r["best_epoch"] for r in rows])),
            "at_floor": sum(r["stop_reason"] == "min_lr" for r in rows),
            "val_dice_zero": sum(r.get("val_dice") == 0 for r in rows),
            "train_seconds_median": float(np.median([r["train_seconds"] for r in rows])),
        }
        for key, rows in grouped.items()
    }


def summarise(records: Sequence[Mapping[str, Any]], preset: Preset) -> dict[str, Any]:
    """Everything the report shows of one regime's records."""
    return {
        "table": method_table(records, preset),
        "paired": paired_table(records, preset),
        "posterior": posterior_table(records, preset),
        "uncertainty": summarise_uncertainty(records),
        "training": training_table(records),
    }

"""Regression and classification metrics, and the brain-age gap with its bias correction.

All functions take array-likes (NumPy arrays, tensors, lists) of one value per subject and
return Python floats.

ICC
---
:func:`icc` implements the single-measure forms of Shrout & Fleiss (1979) from the two-way
ANOVA of an ``(n subjects, k raters)`` table:

* ``"2,1"`` -- two-way random effects, **absolute agreement**:
  ``(MS_R - MS_E) / (MS_R + (k - 1) MS_E + k (MS_C - MS_E) / n)``;
* ``"3,1"`` -- two-way mixed effects, **consistency**: ``(MS_R - MS_E) / (MS_R + (k - 1) MS_E)``;
* ``"1,1"`` -- one-way random effects: ``(MS_R - MS_W) / (MS_R + (k - 1) MS_W)``.

For predictions against ground truth (two "raters") the default is ICC(2,1): a systematic
offset or scale error lowers it, which ICC(3,1) would ignore.

Brain-age gap
-------------
Regression to the mean makes the raw gap (predicted - true age) correlate negatively with
age.  :class:`AgeBiasCorrection` fits ``pred = a * age + b`` on training or validation
subjects only and corrects ``pred' = pred - (a - 1) * age - b`` (Beheshti et al. 2019; the
gap of the corrected prediction is the residual of that fit).  :func:`brain_age_report`
reports raw and corrected metrics side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "AgeBiasCorrection",
    "accuracy",
    "auc",
    "brain_age_report",
    "icc",
    "icc_agreement",
    "mae",
    "mse",
    "pearson_r",
    "r2",
    "regression_report",
    "rmse",
]

ICCForm = Literal["1,1", "2,1", "3,1"]


def _pair(y_true: object, y_pred: object) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(_numpy(y_true), dtype=np.float64).ravel()
    p = np.asarray(_numpy(y_pred), dtype=np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true ({t.size} values) and y_pred ({p.size}) differ in length")
    if t.size == 0:
        raise ValueError("y_true and y_pred are empty")
    for name, a in (("y_true", t), ("y_pred", p)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} holds NaN or inf values")
    return t, p


def _numpy(a: object) -> object:
    detach = getattr(a, "detach", None)
    return detach().cpu().numpy() if detach is not None else a


def mae(y_true: object, y_pred: object) -> float:
    """Mean absolute error."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean(np.abs(p - t)))


def mse(y_true: object, y_pred: object) -> float:
    """Mean squared error."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean((p - t) ** 2))


def rmse(y_true: object, y_pred: object) -> float:
    """Root mean squared error."""
    return float(np.sqrt(mse(y_true, y_pred)))


def pearson_r(y_true: object, y_pred: object) -> float:
    """Pearson correlation; NaN when either side is constant."""
    t, p = _pair(y_true, y_pred)
    dt, dp = t - t.mean(), p - p.mean()
    denom = np.sqrt((dt**2).sum() * (dp**2).sum())
    return float((dt * dp).sum() / denom) if denom > 0 else float("nan")


def r2(y_true: object, y_pred: object) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` (can be negative)."""
    t, p = _pair(y_true, y_pred)
    ss_tot = ((t - t.mean()) ** 2).sum()
    return float(1.0 - ((t - p) ** 2).sum() / ss_tot) if ss_tot > 0 else float("nan")


def icc(ratings: object, form: ICCForm = "2,1") -> float:
    """Intraclass correlation (Shrout & Fleiss 1979, single measures) of a ratings table.

    Parameters
    ----------
    ratings
        ``(n, k)``: ``n >= 2`` subjects rated by ``k >= 2`` raters (or methods).
    form
        ``"2,1"`` (absolute agreement, default), ``"3,1"`` (consistency) or ``"1,1"``.
    """
    x = np.asarray(_numpy(ratings), dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise ValueError(f"ratings must be (n >= 2 subjects, k >= 2 raters), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("ratings holds NaN or inf values")
    if form not in ("1,1", "2,1", "3,1"):
        raise ValueError(f"form must be '1,1', '2,1' or '3,1', got {form!r}")
    n, k = x.shape
    grand = x.mean()
    ss_rows = k * ((x.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((x.mean(axis=0) - grand) ** 2).sum()
    ss_total = ((x - grand) ** 2).sum()
    ss_error = ss_total - ss_rows - ss_cols
    ms_r = ss_rows / (n - 1)
    ms_c = ss_cols / (k - 1)
    ms_e = ss_error / ((n - 1) * (k - 1))
    ms_w = (ss_cols + ss_error) / (n * (k - 1))
    if form == "1,1":
        num, den = ms_r - ms_w, ms_r + (k - 1) * ms_w
    elif form == "2,1":
        num, den = ms_r - ms_e, ms_r + (k - 1) * ms_e + k * (ms_c - ms_e) / n
    else:
        num, den = ms_r - ms_e, ms_r + (k - 1) * ms_e
    return float(num / den) if den != 0 else float("nan")


def icc_agreement(y_true: object, y_pred: object) -> float:
    """ICC(2,1), absolute agreement, between ground truth and predictions."""
    t, p = _pair(y_true, y_pred)
    return icc(np.stack([t, p], axis=1), "2,1")


def accuracy(y_true: object, y_pred: object) -> float:
    """Share of equal labels (pass predicted labels, not scores)."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean(t == p))


def auc(y_true: object, score: object) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties 1/2.

    The Mann-Whitney statistic from average ranks; ``y_true`` is binary (0/1 or bool).
    NaN when one class is absent.
    """
    t, s = _pair(y_true, score)
    if not np.isin(t, (0.0, 1.0)).all():
        raise ValueError("y_true must be binary (0/1)")
    positive = t == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # average ranks over ties (1-based)
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def regression_report(y_true: object, y_pred: object) -> dict[str, float]:
    """``mae``, ``rmse``, ``mse``, ``r``, ``r2`` and ``icc`` (ICC(2,1)) in one dict."""
    return {
        "mae": mae(y_true, y_pred),
        "rmse": rmse(y_true, y_pred),
        "mse": mse(y_true, y_pred),
        "r": pearson_r(y_true, y_pred),
        "r2": r2(y_true, y_pred),
        "icc": icc_agreement(y_true, y_pred),
    }


@dataclass(frozen=True)
class AgeBiasCorrection:
    """Linear age-bias correction of brain-age predictions, fitted on train/val data only.

    Attributes
    ----------
    slope, intercept
        Of ``pred = slope * age + intercept`` on the fitting subjects.
    """

    slope: float
    intercept: float

    @classmethod
    def fit(cls, age: object, predicted: object) -> AgeBiasCorrection:
        """Least-squares fit on training or validation subjects (never the test set)."""
        a, p = _pair(age, predicted)
        if a.size < 2 or np.ptp(a) == 0:
            raise ValueError("age must hold at least two different values to fit the bias")
        slope, intercept = np.polyfit(a, p, 1)
        return cls(float(slope), float(intercept))

    def correct(self, age: object, predicted: object) -> np.ndarray:
        """Corrected predictions ``pred - (slope - 1) * age - intercept``."""
        a, p = _pair(age, predicted)
        return p - (self.slope - 1.0) * a - self.intercept


def brain_age_report(
    age_fit: object, predicted_fit: object, age_test: object, predicted_test: object
) -> dict[str, dict[str, float]]:
    """Raw and bias-corrected brain-age metrics on the test subjects.

    Parameters
    ----------
    age_fit, predicted_fit
        Training or validation subjects: the correction is fitted on them only.
    age_test, predicted_test
        The evaluated subjects.

    Returns
    -------
    dict
        ``{"raw": {...}, "corrected": {...}, "correction": {"slope", "intercept"}}``; each of
        ``raw`` / ``corrected`` holds :func:`regression_report`'s keys plus ``gap_mean``
        (mean predicted - true age) and ``gap_age_r`` (correlation of the gap with age, the
        bias the correction removes).
    """
    correction = AgeBiasCorrection.fit(age_fit, predicted_fit)
    age, raw = _pair(age_test, predicted_test)
    out: dict[str, dict[str, float]] = {}
    for name, pred in (("raw", raw), ("corrected", correction.correct(age, raw))):
        gap = pred - age
        out[name] = {
            **regression_report(age, pred),
            "gap_mean": float(gap.mean()),
            "gap_age_r": pearson_r(age, gap),
        }
    out["correction"] = {"slope": correction.slope, "intercept": correction.intercept}
    return out

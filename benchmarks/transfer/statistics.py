"""Paired comparisons of two methods scored on the same splits and the same test volumes.

The transfer benchmark trains every method on the same ``K`` training splits and scores
each run on the same fixed ``V`` test volumes, so one method's scores are a ``(K, V)``
array and two methods ``A``, ``B`` give paired differences ``d[k, v] = A[k, v] - B[k, v]``.
Splits and volumes are *crossed* (every split is scored on every volume), and both are
sources of noise: another draw of training subjects moves a method's score (split noise),
and so does another test set (volume noise).  :func:`paired_difference` reports the mean
difference with three intervals, one per source of noise and one with both:

* ``ci_splits``: the t-interval across the ``K`` per-split means (training-split noise
  only; the test set is taken as fixed), with the paired t-test's p-value;
* ``ci_volumes``: a bootstrap over the test volumes only, splits fixed (test-set noise
  only);
* ``ci_both``: the crossed two-way bootstrap, splits *and* volumes resampled
  independently in each replicate; the headline interval.

A NaN score (a metric undefined for a volume, e.g. HD95 of an empty prediction) drops
that volume's pair from its split: per-split means are NaN-aware means over volumes.

:func:`minimum_detectable_difference` is the usual power-analysis answer to "how large a
difference could these splits have detected", and :func:`mean_interval` the mean and
t-interval of one method's scores across splits.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

__all__ = [
    "PairedDifference",
    "mean_interval",
    "minimum_detectable_difference",
    "paired_difference",
]

#: Rough memory budget (bytes) of one chunk of bootstrap replicates.
_CHUNK_BYTES = 200_000_000


def _float(x: float | None) -> float | None:
    """A JSON-safe float: ``None`` for ``None`` and for NaN / infinity."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


def _interval(ci: tuple[float, float] | None) -> list[float | None] | None:
    return None if ci is None else [_float(ci[0]), _float(ci[1])]


@dataclass(frozen=True)
class PairedDifference:
    """The paired difference ``A - B`` of two methods' ``(K, V)`` score arrays.

    Attributes
    ----------
    mean : float
        Mean over the ``K`` splits of the per-split (NaN-aware) mean over volumes of
        ``d = A - B``.
    n_splits : int
        ``K``, the number of training splits (rows).
    n_volumes : int
        ``V``, the number of test volumes (columns).
    ci_splits : tuple of float or None
        ``(low, high)``: the t-interval ``mean +- t_{(1+c)/2, K-1} * sd / sqrt(K)`` of the
        ``K`` per-split means (``sd`` with ``ddof=1``); ``None`` when ``K < 2``.
    ci_volumes : tuple of float or None
        ``(low, high)``: percentile bootstrap over the test volumes, splits fixed (the same
        resampled volume indices for every split).  ``None`` only if no replicate had a
        defined value (cannot happen without NaNs).
    ci_both : tuple of float or None
        ``(low, high)``: percentile bootstrap resampling splits and volumes independently
        in each replicate (both sources of noise; the headline interval).
    p_value : float or None
        Two-sided one-sample t-test of the ``K`` per-split means against 0 (the paired
        t-test across splits); ``None`` when ``K < 2`` or the split means do not vary
        (their sd is at rounding level, then taken as 0 for ``ci_splits`` and ``mdd`` too).
    mdd : float
        :func:`minimum_detectable_difference` of the split means' sample standard
        deviation and ``K``, at ``alpha = 1 - confidence`` and power 0.8 (NaN when
        ``K < 2``).
    confidence : float
        The confidence level of the intervals.
    n_boot : int
        Bootstrap replicates drawn.
    seed : int
        Seed of the bootstrap's :func:`numpy.random.default_rng`.
    """

    mean: float
    n_splits: int
    n_volumes: int
    ci_splits: tuple[float, float] | None
    ci_volumes: tuple[float, float] | None
    ci_both: tuple[float, float] | None
    p_value: float | None
    mdd: float
    confidence: float = 0.95
    n_boot: int = 2000
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: plain floats and ints, intervals as ``[low, high]`` lists, ``None``
        for anything undefined (including a NaN ``mdd``)."""
        return {
            "mean": _float(self.mean),
            "n_splits": int(self.n_splits),
            "n_volumes": int(self.n_volumes),
            "ci_splits": _interval(self.ci_splits),
            "ci_volumes": _interval(self.ci_volumes),
            "ci_both": _interval(self.ci_both),
            "p_value": _float(self.p_value),
            "mdd": _float(self.mdd),
            "confidence": float(self.confidence),
            "n_boot": int(self.n_boot),
            "seed": int(self.seed),
        }

    def text(self, digits: int = 3) -> str:
        """The mean with the crossed bootstrap interval ``ci_both``, signed, e.g.
        ``"+0.012 [-0.004, +0.028]"`` (just the mean when the interval is undefined)."""
        mean = f"{self.mean:+.{digits}f}"
        if self.ci_both is None:
            return mean
        low, high = self.ci_both
        return f"{mean} [{low:+.{digits}f}, {high:+.{digits}f}]"


def _as_scores(x: ArrayLike, name: str) -> NDArray[np.float64]:
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (splits, volumes), got shape {array.shape}")
    if array.shape[0] < 1:
        raise ValueError(f"{name} needs at least one split (row), got shape {array.shape}")
    if array.shape[1] < 1:
        raise ValueError(f"{name} needs at least one volume (column), got shape {array.shape}")
    return array


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")


def _t_half_width(sd: float, n: int, confidence: float) -> float:
    """Half the width of the t-interval of a mean of ``n`` values with sample sd ``sd``."""
    return float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * sd / math.sqrt(n)


def _percentile(replicates: NDArray[np.float64], confidence: float) -> tuple[float, float] | None:
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return None
    low, high = np.quantile(finite, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return float(low), float(high)


def _bootstrap(
    d: NDArray[np.float64], n_boot: int, seed: int
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Replicates of the mean difference: over volumes only, and over splits and volumes.

    Each replicate ``b`` draws ``V`` volume indices and ``K`` split indices uniformly with
    replacement (``rng.integers``, in chunks of replicates; per chunk the volume indices
    ``(c, V)`` first, then the split indices ``(c, K)``).  The same volume indices serve
    both kinds of replicate.  Resampling volumes with replacement is weighting each volume
    by how often it was drawn, so with the draw counts ``n[b, v]``, ``x`` the differences
    with NaN set to 0 and ``m`` the indicator of a defined difference, the per-split mean
    of replicate ``b`` is ``S[b, k] = sum_v n[b, v] x[k, v] / sum_v n[b, v] m[k, v]``, the
    NaN-aware mean of the gathered ``d[k, idx[b]]``, computed as two matrix products
    instead of gathering a ``(n_boot, K, V)`` array.  Then the volume replicate is the mean
    of ``S[b, :]`` over all splits, and the crossed replicate the mean of ``S[b, j[b]]``
    over the resampled splits ``j[b]``.  A split whose resampled volumes are all NaN is
    left out of that replicate's mean (NaN-aware over splits too); a replicate left with
    no split at all is NaN and dropped from the percentiles.
    """
    n_splits, n_volumes = d.shape
    defined = ~np.isnan(d)
    values = np.where(defined, d, 0.0)
    weights = defined.astype(np.float64)
    # bytes per replicate: volume indices, flat indices, counts and their float copy (V
    # each), split indices, the two products, their ratio and its gather (K each)
    per_replicate = 8 * (4 * n_volumes + 6 * n_splits)
    chunk = int(max(1, min(n_boot, _CHUNK_BYTES // per_replicate)))
    rng = np.random.default_rng(seed)
    over_volumes = np.empty(n_boot)
    over_both = np.empty(n_boot)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices, 0 / 0
        for start in range(0, n_boot, chunk):
            size = min(chunk, n_boot - start)
            volumes = rng.integers(0, n_volumes, size=(size, n_volumes))
            splits = rng.integers(0, n_splits, size=(size, n_splits))
            rows = np.arange(size)[:, None] * n_volumes
            counts = np.bincount((rows + volumes).ravel(), minlength=size * n_volumes)
            counts = counts.reshape(size, n_volumes).astype(np.float64)
            split_means = (counts @ values.T) / (counts @ weights.T)  # (size, K), NaN if 0/0
            over_volumes[start : start + size] = np.nanmean(split_means, axis=1)
            gathered = np.take_along_axis(split_means, splits, axis=1)
            over_both[start : start + size] = np.nanmean(gathered, axis=1)
    return over_volumes, over_both


def paired_difference(
    a: ArrayLike,
    b: ArrayLike,
    *,
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> PairedDifference:
    """The paired difference ``a - b`` of two methods with its intervals and t-test.

    Parameters
    ----------
    a, b : array_like, shape (K, V)
        Per-volume scores of methods A and B: row ``k`` the run trained on split ``k``,
        column ``v`` test volume ``v`` (the same splits and volumes for both).  NaN marks
        an undefined score; a pair with a NaN on either side is ignored.
    confidence : float, default 0.95
        Confidence level of the three intervals (and ``alpha = 1 - confidence`` of the
        minimum detectable difference).
    n_boot : int, default 2000
        Bootstrap replicates, for ``ci_volumes`` and ``ci_both``.
    seed : int, default 0
        Seed of :func:`numpy.random.default_rng` for the bootstrap: the same seed and
        inputs give the same numbers.

    Returns
    -------
    PairedDifference
        See its attributes.  With ``d`` the ``(K, V)`` differences and ``m`` the ``(K,)``
        NaN-aware per-split means of ``d`` over volumes: ``mean = m.mean()``;
        ``ci_splits``, ``p_value`` and ``mdd`` from ``m`` alone (t-distribution with
        ``K - 1`` degrees of freedom); ``ci_volumes`` and ``ci_both`` percentile intervals
        of ``n_boot`` bootstrap replicates of ``mean``, resampling volumes (the same
        indices for every split, since every split is scored on the same test set), and
        resampling splits and volumes independently, respectively.

    Raises
    ------
    ValueError
        If ``a`` or ``b`` is not 2-D with at least one row and one column, if their shapes
        differ, if a split has no volume with both scores defined, or if ``confidence`` or
        ``n_boot`` is out of range.
    """
    a_scores = _as_scores(a, "a")
    b_scores = _as_scores(b, "b")
    if a_scores.shape != b_scores.shape:
        raise ValueError(f"b has shape {b_scores.shape}, a has shape {a_scores.shape}")
    _check_confidence(confidence)
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot}")
    n_boot = int(n_boot)

    d = a_scores - b_scores  # NaN wherever either side is NaN
    empty = np.flatnonzero(np.isnan(d).all(axis=1))
    if empty.size:
        raise ValueError(
            f"split(s) {empty.tolist()} of a - b have no volume with both scores defined"
        )
    n_splits, n_volumes = d.shape
    split_means = np.nanmean(d, axis=1)
    mean = float(split_means.mean())

    ci_splits: tuple[float, float] | None = None
    p_value: float | None = None
    mdd = math.nan
    if n_splits >= 2:
        sd = float(split_means.std(ddof=1))
        # split means equal up to rounding (identical rows averaged in a different order)
        # do not vary: a t-test on rounding noise would be meaningless
        if sd <= 16 * np.finfo(np.float64).eps * float(np.abs(split_means).max()):
            sd = 0.0
        half = _t_half_width(sd, n_splits, confidence)
        ci_splits = (mean - half, mean + half)
        if sd > 0.0:
            p_value = float(stats.ttest_1samp(split_means, 0.0).pvalue)
        mdd = minimum_detectable_difference(sd, n_splits, alpha=1.0 - confidence)

    over_volumes, over_both = _bootstrap(d, n_boot, seed)
    return PairedDifference(
        mean=mean,
        n_splits=n_splits,
        n_volumes=n_volumes,
        ci_splits=ci_splits,
        ci_volumes=_percentile(over_volumes, confidence),
        ci_both=_percentile(over_both, confidence),
        p_value=p_value,
        mdd=mdd,
        confidence=float(confidence),
        n_boot=n_boot,
        seed=int(seed),
    )


def minimum_detectable_difference(
    sd: float, n: int, *, alpha: float = 0.05, power: float = 0.8
) -> float:
    """The smallest true mean paired difference a paired t-test detects with ``power``.

    For a two-sided paired t-test at level ``alpha`` on ``n`` split means whose standard
    deviation is ``sd``::

        mdd = (t_{1 - alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n)

    This is the standard approximation: it replaces the noncentral t distribution of the
    test statistic under the alternative by a central t shifted by the noncentrality, and
    ignores rejections in the wrong tail.  The exact power at ``mdd`` (from
    :data:`scipy.stats.nct`) is slightly below ``power`` for few splits (0.791 instead of
    0.8 for ``n = 5``, 0.766 for ``n = 3``) and converges to it as ``n`` grows.

    Parameters
    ----------
    sd : float
        Standard deviation of the ``n`` per-split mean differences (non-negative).
    n : int
        Number of splits (paired observations).
    alpha : float, default 0.05
        Two-sided significance level, in (0, 1).
    power : float, default 0.8
        Probability of detection, in (0, 1).

    Returns
    -------
    float
        The minimum detectable difference, in the units of ``sd``; NaN when ``n < 2`` (or
        ``sd`` is NaN), 0 when ``sd`` is 0.

    Raises
    ------
    ValueError
        If ``sd`` is negative or ``alpha`` or ``power`` lies outside (0, 1).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must lie in (0, 1), got {power}")
    if sd < 0:
        raise ValueError(f"sd must be non-negative, got {sd}")
    if n < 2 or math.isnan(sd):
        return math.nan
    if sd == 0:
        return 0.0
    df = n - 1
    factor = float(stats.t.ppf(1.0 - alpha / 2.0, df) + stats.t.ppf(power, df))
    return factor * float(sd) / math.sqrt(n)


def mean_interval(values: ArrayLike, confidence: float = 0.95) -> tuple[float, float, float]:
    """The mean of ``values`` and its t-interval, ignoring NaNs.

    Parameters
    ----------
    values : array_like, shape (n,)
        E.g. one method's per-split mean scores.
    confidence : float, default 0.95
        Confidence level, in (0, 1).

    Returns
    -------
    tuple of float
        ``(mean, low, high)`` with ``low, high = mean -+ t_{(1+c)/2, m-1} * sd / sqrt(m)``
        over the ``m`` non-NaN values (``sd`` with ``ddof=1``).  ``low`` and ``high`` are
        NaN when ``m < 2``, all three when ``m = 0``.

    Raises
    ------
    ValueError
        If ``values`` is not 1-D or ``confidence`` lies outside (0, 1).
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {array.shape}")
    _check_confidence(confidence)
    finite = array[~np.isnan(array)]
    if finite.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(finite.mean())
    if finite.size < 2:
        return mean, math.nan, math.nan
    sd = float(finite.std(ddof=1))
    half = _t_half_width(sd, finite.size, confidence)
    return mean, mean - half, mean + half

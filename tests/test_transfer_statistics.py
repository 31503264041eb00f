"""Paired differences of two methods' (splits, volumes) scores: benchmarks/transfer/statistics.

Random tolerances are derived from the sample sizes, never tuned to the seeds: a bootstrap
percentile from ``n_boot`` replicates, and a rate from ``n`` simulated datasets, are
checked within 4 binomial standard errors (a chance failure below 1e-4 per check), and the
seeds are fixed, so the suite is deterministic.  Everything runs in about a second.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import warnings

import numpy as np
import pytest
from scipy import stats

from benchmarks.transfer import statistics
from benchmarks.transfer.statistics import (
    PairedDifference,
    mean_interval,
    minimum_detectable_difference,
    paired_difference,
)
from benchmarks.transfer.summary import verdict

Z = 4.0  # standard errors allowed to a Monte Carlo estimate


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1.0 - p) / n)


def reference_bootstrap(
    d: np.ndarray, n_boot: int, seed: int, chunk: int, confidence: float = 0.95
) -> tuple[tuple[float, float], tuple[float, float]]:
    """The documented bootstrap, literally: the same draws (per chunk, volume indices then
    split indices), the gathered ``(n_boot, K, V)`` array and ``np.nanmean``."""
    rng = np.random.default_rng(seed)
    over_volumes, over_both = [], []
    n_splits, n_volumes = d.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices of the nanmeans
        for start in range(0, n_boot, chunk):
            size = min(chunk, n_boot - start)
            volumes = rng.integers(0, n_volumes, size=(size, n_volumes))
            splits = rng.integers(0, n_splits, size=(size, n_splits))
            fixed = d[np.arange(n_splits)[None, :, None], volumes[:, None, :]]
            crossed = d[splits[:, :, None], volumes[:, None, :]]
            over_volumes.append(np.nanmean(np.nanmean(fixed, axis=2), axis=1))
            over_both.append(np.nanmean(np.nanmean(crossed, axis=2), axis=1))
    q = [(1 - confidence) / 2, (1 + confidence) / 2]

    def interval(reps: list[np.ndarray]) -> tuple[float, float]:
        values = np.concatenate(reps)
        low, high = np.quantile(values[np.isfinite(values)], q)
        return float(low), float(high)

    return interval(over_volumes), interval(over_both)


def test_no_volume_noise_is_the_bootstrap_of_the_split_means():
    # d[k, v] = c_k: the test set changes nothing, only the splits vary.
    c = np.array([0.01, -0.02, 0.03, 0.05, 0.0])
    n_volumes, n_boot = 30, 2000
    b = np.random.default_rng(1).uniform(0.5, 0.9, size=(c.size, n_volumes))
    result = paired_difference(b + c[:, None], b, n_boot=n_boot, seed=3)

    assert result.mean == pytest.approx(c.mean(), abs=1e-12)
    low, high = result.ci_volumes
    assert low == pytest.approx(c.mean(), abs=1e-12)
    assert high == pytest.approx(c.mean(), abs=1e-12)
    expected = stats.t.interval(0.95, c.size - 1, loc=c.mean(), scale=stats.sem(c))
    np.testing.assert_allclose(result.ci_splits, expected, rtol=1e-10)

    # ci_both is then the percentile interval of the bootstrap of the K split means, whose
    # exact distribution is that of the mean of all K^K ordered resamples.  Each end is an
    # empirical quantile of n_boot draws from it: the exact CDF just below / at that end
    # lies within binomial error (plus one replicate's 1/n_boot of interpolation) of the
    # quantile's level.
    exact = np.sort(c[np.array(list(itertools.product(range(c.size), repeat=c.size)))].mean(1))
    for level, end in zip((0.025, 0.975), result.ci_both, strict=True):
        below = np.searchsorted(exact, end - 1e-12, side="left") / exact.size
        at = np.searchsorted(exact, end + 1e-12, side="right") / exact.size
        tol = Z * binomial_se(level, n_boot) + 1.0 / n_boot
        assert below <= level + tol
        assert at >= level - tol
    # and it is far wider than the (zero-width) volume interval
    assert result.ci_both[1] - result.ci_both[0] > 0.02


def test_no_split_effect_is_the_bootstrap_of_the_volumes():
    # d[k, v] = e_v: every split has the same differences; only the test set varies.
    n_splits, n_volumes, n_boot = 5, 400, 2000
    e = np.random.default_rng(2).normal(0.01, 0.05, size=n_volumes)
    d = np.tile(e, (n_splits, 1))
    result = paired_difference(d, np.zeros_like(d), n_boot=n_boot, seed=4)

    assert result.mean == pytest.approx(e.mean(), abs=1e-12)
    assert result.ci_splits == (result.mean, result.mean)
    assert result.p_value is None  # the split means do not vary
    assert result.mdd == 0.0
    # resampling identical splits changes nothing
    np.testing.assert_allclose(result.ci_both, result.ci_volumes, atol=1e-12)

    # Normal theory: the bootstrap distribution of the mean is about N(mean, s^2 / V), s the
    # plug-in (ddof=0) sd, so the width is 2 z s / sqrt(V).  Monte Carlo error of an
    # empirical p-quantile from n_boot draws: sqrt(p (1 - p) / n_boot) / phi(z) standard
    # errors; the width's, sqrt(2) times that (two nearly independent ends).
    z = stats.norm.ppf(0.975)
    se = e.std() / math.sqrt(n_volumes)
    width = result.ci_volumes[1] - result.ci_volumes[0]
    mc_se = math.sqrt(2.0) * binomial_se(0.025, n_boot) / stats.norm.pdf(z) * se
    assert abs(width - 2 * z * se) <= Z * mc_se
    assert abs((result.ci_volumes[0] + result.ci_volumes[1]) / 2 - result.mean) <= Z * mc_se


def test_crossed_interval_covers_under_a_two_way_random_effects_model():
    # d[k, v] = 0.02 + s_k + u_v + eps_kv: split effects sd 0.02, volume effects sd 0.05,
    # a small interaction sd 0.01; K = 5 splits, V = 20 volumes, 300 datasets.
    truth, n_sets, n_splits, n_volumes = 0.02, 300, 5, 20
    rng = np.random.default_rng(2024)
    covered = {"ci_both": 0, "ci_splits": 0, "ci_volumes": 0}
    for i in range(n_sets):
        d = (
            truth
            + rng.normal(0, 0.02, size=(n_splits, 1))
            + rng.normal(0, 0.05, size=(1, n_volumes))
            + rng.normal(0, 0.01, size=(n_splits, n_volumes))
        )
        result = paired_difference(d, np.zeros_like(d), n_boot=500, seed=i)
        for name in covered:
            low, high = getattr(result, name)
            covered[name] += low <= truth <= high
    rates = {name: count / n_sets for name, count in covered.items()}
    # A 95% percentile bootstrap with K = 5 splits under-covers: it uses normal-like
    # quantiles where the split component has only 4 degrees of freedom, and the plug-in
    # variance of 5 split means is (K-1)/K = 0.8 of the unbiased one.  Its coverage here is
    # about 0.92 (3000 datasets offline); we require at least 0.90, less 4 binomial
    # standard errors at n_sets.
    assert rates["ci_both"] >= 0.90 - Z * binomial_se(0.90, n_sets), rates
    # Each one-source interval misses the other source's noise (about 0.85 each): the
    # crossed interval must cover more often than either.
    assert rates["ci_both"] > max(rates["ci_splits"], rates["ci_volumes"]), rates


def _difference(ci_both, ci_splits) -> PairedDifference:
    return PairedDifference(0.0, 5, 20, ci_splits, ci_both, ci_both, None, math.nan)


@pytest.mark.parametrize(
    ("ci_both", "ci_splits", "expected"),
    [
        ((0.01, 0.05), (0.02, 0.04), "better"),
        ((-0.05, -0.01), (-0.04, -0.001), "worse"),
        ((0.002, 0.157), (-0.025, 0.182), "no detectable difference"),  # quick, far, DWP - PR
        ((-0.02, 0.05), (0.01, 0.03), "no detectable difference"),
        ((0.01, 0.05), None, "no detectable difference"),  # one split: no t-interval
        (None, (0.01, 0.05), "no detectable difference"),
    ],
)
def test_a_verdict_needs_both_intervals_on_one_side(ci_both, ci_splits, expected):
    assert verdict(_difference(ci_both, ci_splits)) == expected


def test_the_verdict_keeps_its_false_rate_where_the_bootstrap_alone_does_not():
    """No true difference, the splits' noise dominant, K = 5: the crossed bootstrap alone
    calls a difference far more often than 5 % (about 16 %, 1000 datasets offline); the
    verdict, which also needs the t-interval, stays within 4 binomial errors of 5 %."""
    n_sets, n_splits, n_volumes = 400, 5, 20
    rng = np.random.default_rng(7)
    bootstrap_alone = called = 0
    for i in range(n_sets):
        d = rng.normal(0, 0.05, size=(n_splits, 1)) + rng.normal(0, 0.01, (n_splits, n_volumes))
        result = paired_difference(d, np.zeros_like(d), n_boot=500, seed=i)
        low, high = result.ci_both
        bootstrap_alone += low > 0 or high < 0
        called += verdict(result) != "no detectable difference"
    bound = 0.05 + Z * binomial_se(0.05, n_sets)
    assert bootstrap_alone / n_sets > bound  # the defect the rule exists for
    assert called / n_sets <= bound


def test_t_interval_and_p_value_match_scipy():
    a = np.array(
        [
            [0.80, 0.70, 0.90],
            [0.75, 0.65, 0.85],
            [0.82, 0.74, 0.88],
            [0.79, 0.69, 0.93],
        ]
    )
    b = np.array(
        [
            [0.70, 0.72, 0.80],
            [0.71, 0.60, 0.83],
            [0.70, 0.71, 0.79],
            [0.77, 0.70, 0.88],
        ]
    )
    result = paired_difference(a, b, confidence=0.9)
    m = (a - b).mean(axis=1)
    assert result.mean == pytest.approx(m.mean())
    assert (result.n_splits, result.n_volumes) == (4, 3)
    np.testing.assert_allclose(
        result.ci_splits, stats.t.interval(0.9, 3, loc=m.mean(), scale=stats.sem(m)), rtol=1e-12
    )
    assert result.p_value == pytest.approx(stats.ttest_rel(a.mean(1), b.mean(1)).pvalue)
    assert result.p_value == pytest.approx(stats.ttest_1samp(m, 0.0).pvalue)
    assert result.mdd == pytest.approx(minimum_detectable_difference(m.std(ddof=1), 4, alpha=0.1))


def test_mean_interval():
    values = np.array([0.71, np.nan, 0.74, 0.69, 0.77, 0.73])
    finite = values[~np.isnan(values)]
    mean, low, high = mean_interval(values)
    assert mean == pytest.approx(finite.mean())
    expected = stats.t.interval(0.95, finite.size - 1, loc=finite.mean(), scale=stats.sem(finite))
    np.testing.assert_allclose((low, high), expected, rtol=1e-12)
    mean, low, high = mean_interval([0.5, np.nan])
    assert mean == 0.5 and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(x) for x in mean_interval([np.nan]))
    with pytest.raises(ValueError, match="values"):
        mean_interval(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="confidence"):
        mean_interval([1.0, 2.0], confidence=1.5)


def test_minimum_detectable_difference_closed_form_and_monotone():
    for sd, n, alpha, power in [(0.03, 5, 0.05, 0.8), (1.0, 10, 0.01, 0.9), (0.2, 2, 0.1, 0.5)]:
        df = n - 1
        expected = (stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * sd / math.sqrt(n)
        assert minimum_detectable_difference(sd, n, alpha=alpha, power=power) == pytest.approx(
            expected, rel=1e-12
        )
    by_sd = [minimum_detectable_difference(sd, 5) for sd in (0.01, 0.02, 0.05, 0.1)]
    assert np.all(np.diff(by_sd) > 0)
    by_n = [minimum_detectable_difference(0.02, n) for n in (2, 3, 5, 10, 30)]
    assert np.all(np.diff(by_n) < 0)
    assert math.isnan(minimum_detectable_difference(0.02, 1))
    assert minimum_detectable_difference(0.0, 5) == 0.0
    with pytest.raises(ValueError, match="sd"):
        minimum_detectable_difference(-1.0, 5)
    with pytest.raises(ValueError, match="power"):
        minimum_detectable_difference(1.0, 5, power=1.0)


def test_minimum_detectable_difference_is_detected_with_the_power():
    n, sd, n_sims = 5, 1.0, 2000
    delta = minimum_detectable_difference(sd, n)
    samples = np.random.default_rng(7).normal(delta, sd, size=(n_sims, n))
    rate = float(np.mean(stats.ttest_1samp(samples, 0.0, axis=1).pvalue < 0.05))
    # The exact power at the mdd (noncentral t) is a little under 0.8: the documented
    # approximation error, 0.791 at n = 5.
    df, crit = n - 1, stats.t.ppf(0.975, n - 1)
    exact = stats.nct.sf(crit, df, delta * math.sqrt(n) / sd) + stats.nct.cdf(
        -crit, df, delta * math.sqrt(n) / sd
    )
    assert abs(exact - 0.8) < 0.01
    assert abs(rate - exact) <= Z * binomial_se(exact, n_sims)
    assert abs(rate - 0.8) <= 0.01 + Z * binomial_se(0.8, n_sims)


def test_nans_are_ignored_pairwise():
    rng = np.random.default_rng(5)
    a = rng.uniform(0.5, 0.9, size=(6, 8))
    b = rng.uniform(0.5, 0.9, size=(6, 8))
    a[0, [1, 4]] = np.nan
    b[2, 3] = np.nan
    b[0, 4] = np.nan  # both undefined on the same volume
    a[5, :7] = np.nan  # split 5 keeps a single defined pair
    result = paired_difference(a, b, n_boot=400, seed=11)

    means = []
    for k in range(6):
        keep = ~(np.isnan(a[k]) | np.isnan(b[k]))
        means.append((a[k, keep] - b[k, keep]).mean())
    assert result.mean == pytest.approx(np.mean(means), abs=1e-12)
    np.testing.assert_allclose(
        result.ci_splits,
        stats.t.interval(0.95, 5, loc=np.mean(means), scale=stats.sem(means)),
        rtol=1e-10,
    )
    for ci in (result.ci_volumes, result.ci_both):
        assert ci is not None and all(math.isfinite(x) for x in ci) and ci[0] <= ci[1]
    # Split 5 has one defined volume, so many replicates miss it: the vectorised bootstrap
    # must equal the literal gather-and-nanmean one, replicate draws and NaN rules included.
    vol, both = reference_bootstrap(a - b, 400, 11, chunk=400)
    np.testing.assert_allclose(result.ci_volumes, vol, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(result.ci_both, both, rtol=1e-12, atol=1e-14)

    # a split whose every pair has a NaN on one side or the other
    a2, b2 = np.ones((3, 4)), np.zeros((3, 4))
    a2[1, :2] = np.nan
    b2[1, 2:] = np.nan
    with pytest.raises(ValueError, match=r"split\(s\) \[1\]"):
        paired_difference(a2, b2)


def test_chunked_bootstrap_matches_the_reference(monkeypatch):
    rng = np.random.default_rng(6)
    d = rng.normal(0.01, 0.05, size=(5, 9))
    d[1, 2] = np.nan
    chunk = 7  # forces 43 chunks of 7 replicates (the last of 6)
    monkeypatch.setattr(statistics, "_CHUNK_BYTES", 8 * (4 * 9 + 6 * 5) * chunk)
    result = paired_difference(d, np.zeros_like(d), n_boot=300, seed=2)
    vol, both = reference_bootstrap(d, 300, 2, chunk=chunk)
    np.testing.assert_allclose(result.ci_volumes, vol, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(result.ci_both, both, rtol=1e-12, atol=1e-14)


def test_same_seed_same_numbers():
    rng = np.random.default_rng(8)
    a, b = rng.uniform(size=(5, 12)), rng.uniform(size=(5, 12))
    first = paired_difference(a, b, seed=3)
    assert paired_difference(a, b, seed=3) == first
    assert paired_difference(a.tolist(), b.tolist(), seed=3) == first
    other = paired_difference(a, b, seed=4)
    assert other.ci_both != first.ci_both
    assert (other.mean, other.ci_splits, other.p_value) == (
        first.mean,
        first.ci_splits,
        first.p_value,
    )


def test_as_dict_text_and_one_split():
    result = paired_difference([[0.8, 0.7, np.nan]], [[0.7, 0.75, 0.6]], n_boot=200)
    assert result.n_splits == 1
    assert result.ci_splits is None and result.p_value is None and math.isnan(result.mdd)
    record = result.as_dict()
    json.dumps(record, allow_nan=False)  # strict JSON: no NaN
    assert record["ci_splits"] is None and record["p_value"] is None and record["mdd"] is None
    assert record["mean"] == pytest.approx(0.025)
    assert record["ci_both"] == list(result.ci_both)
    assert result.ci_both == result.ci_volumes  # one split: nothing to resample there
    assert re.fullmatch(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]", result.text())

    fixed = PairedDifference(
        mean=0.012,
        n_splits=5,
        n_volumes=20,
        ci_splits=(0.0, 0.024),
        ci_volumes=(0.001, 0.023),
        ci_both=(-0.004, 0.028),
        p_value=0.06,
        mdd=0.02,
    )
    assert fixed.text() == "+0.012 [-0.004, +0.028]"
    assert fixed.text(digits=2) == "+0.01 [-0.00, +0.03]"
    assert json.loads(json.dumps(fixed.as_dict()))["ci_volumes"] == [0.001, 0.023]
    with pytest.raises(dataclasses.FrozenInstanceError):
        fixed.mean = 0.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "match"),
    [
        (np.zeros(4), np.zeros(4), {}, r"^a must be 2-D"),
        (np.zeros((2, 3)), np.zeros((2, 3, 1)), {}, r"^b must be 2-D"),
        (np.zeros((2, 3)), np.zeros((3, 2)), {}, r"^b has shape"),
        (np.zeros((0, 3)), np.zeros((0, 3)), {}, r"^a needs at least one split"),
        (np.zeros((2, 3)), np.zeros((2, 0)), {}, r"^b needs at least one volume"),
        (np.full((2, 3), np.nan), np.zeros((2, 3)), {}, r"split\(s\) \[0, 1\]"),
        (np.zeros((2, 3)), np.zeros((2, 3)), {"confidence": 1.0}, "confidence"),
        (np.zeros((2, 3)), np.zeros((2, 3)), {"n_boot": 0}, "n_boot"),
    ],
)
def test_bad_input(a, b, kwargs, match):
    with pytest.raises(ValueError, match=match):
        paired_difference(a, b, **kwargs)

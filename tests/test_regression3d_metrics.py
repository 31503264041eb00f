"""Metrics against published values, closed forms and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import mean_absolute_error, r2_score, roc_auc_score

from regression3d import (
    AgeBiasCorrection,
    accuracy,
    auc,
    brain_age_report,
    icc,
    icc_agreement,
    mae,
    pearson_r,
    r2,
    regression_report,
    rmse,
)

# Shrout & Fleiss (1979), table 2: 6 targets rated by 4 judges
SHROUT_FLEISS = np.array(
    [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]],
    dtype=float,
)


def test_icc_reproduces_shrout_and_fleiss_table_4() -> None:
    assert icc(SHROUT_FLEISS, "1,1") == pytest.approx(0.17, abs=0.005)
    assert icc(SHROUT_FLEISS, "2,1") == pytest.approx(0.29, abs=0.005)
    assert icc(SHROUT_FLEISS, "3,1") == pytest.approx(0.71, abs=0.005)


def test_icc_agreement_penalises_an_offset_and_consistency_does_not() -> None:
    t = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert icc_agreement(t, t) == pytest.approx(1.0)
    shifted = np.stack([t, t + 2], axis=1)
    assert icc(shifted, "3,1") == pytest.approx(1.0)
    # closed form with MS_E = 0: MS_R / (MS_R + k * MS_C / n), MS_R = 2 * 2.5, MS_C = 5 * 2
    assert icc(shifted, "2,1") == pytest.approx(5.0 / (5.0 + 2 * 10.0 / 5))


def test_regression_metrics_against_closed_forms_and_sklearn() -> None:
    rng = np.random.default_rng(0)
    t = rng.normal(50, 10, 40)
    p = t + rng.normal(0, 5, 40)
    assert mae(t, p) == pytest.approx(mean_absolute_error(t, p))
    assert rmse(t, p) == pytest.approx(np.sqrt(np.mean((t - p) ** 2)))
    assert r2(t, p) == pytest.approx(r2_score(t, p))
    assert pearson_r(t, p) == pytest.approx(np.corrcoef(t, p)[0, 1])
    assert mae(torch.tensor(t), torch.tensor(p)) == pytest.approx(mae(t, p))  # tensors too
    report = regression_report(t, p)
    assert set(report) == {"mae", "rmse", "mse", "r", "r2", "icc"}


def test_auc_with_ties_against_sklearn_and_accuracy() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    score = np.round(y * 0.5 + rng.normal(0, 1, 200), 1)  # rounded: many ties
    assert auc(y, score) == pytest.approx(roc_auc_score(y, score))
    assert auc([0, 1], [0.3, 0.3]) == pytest.approx(0.5)
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert np.isnan(auc([1, 1], [0.1, 0.2]))
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75


def test_bias_correction_removes_regression_to_the_mean() -> None:
    rng = np.random.default_rng(2)
    age_train, age_test = rng.uniform(18, 90, 60), rng.uniform(18, 90, 30)

    def shrunk(a):  # predictions pulled toward the mean age, as a trained model does
        return 0.6 * a + 0.4 * 54 + rng.normal(0, 1, a.size)

    report = brain_age_report(age_train, shrunk(age_train), age_test, shrunk(age_test))
    assert report["correction"]["slope"] == pytest.approx(0.6, abs=0.05)
    assert report["raw"]["gap_age_r"] < -0.9
    assert abs(report["corrected"]["gap_age_r"]) < 0.5
    assert report["corrected"]["mae"] < 0.25 * report["raw"]["mae"]
    # the correction is a fixed function of the fitting data only
    c = AgeBiasCorrection(slope=0.5, intercept=10.0)
    np.testing.assert_allclose(c.correct([20.0, 40.0], [20.0, 30.0]), [20.0, 30.0 + 20 - 10])


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        mae([1, 2], [1])
    with pytest.raises(ValueError, match="NaN"):
        rmse([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="ratings"):
        icc(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="binary"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="age"):
        AgeBiasCorrection.fit([30.0, 30.0], [1.0, 2.0])

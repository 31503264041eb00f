"""Uncertainty quality as numbers: NLL, Brier, ECE and the error-detection AUROC, against
hand-computed cases and scikit-learn's twins (binary, multiclass, ties, segmentations)."""

import math

import pytest
import torch

import dwp
from dwp.uncertainty import PROBABILITY_FLOOR

# Three predictions of two classes: right and confident, wrong, a coin flip.
PROBS = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], dtype=torch.float64)
TARGET = torch.tensor([0, 0, 1])


def _random_case(n: int, n_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = (3 * torch.randn(n, n_classes, generator=g, dtype=torch.float64)).softmax(1)
    target = torch.randint(0, n_classes, (n,), generator=g)
    return probs, target


# ----------------------------------------------------------------------------- NLL, Brier


def test_nll_and_brier_hand_computed():
    nll = dwp.negative_log_likelihood(PROBS, TARGET)
    assert nll.item() == pytest.approx(-(math.log(0.9) + math.log(0.2) + math.log(0.5)) / 3)
    # (0.1^2 + 0.1^2) + (0.8^2 + 0.8^2) + (0.5^2 + 0.5^2) = 0.02 + 1.28 + 0.5, over 3
    assert dwp.brier_score(PROBS, TARGET).item() == pytest.approx(0.6)
    assert nll.dtype == torch.float64
    # the same problem as binary probabilities of class 1 (C == 1) gives the same numbers
    binary = PROBS[:, 1:]
    assert dwp.negative_log_likelihood(binary, TARGET).item() == pytest.approx(nll.item())
    assert dwp.brier_score(binary, TARGET).item() == pytest.approx(0.6)


def test_nll_floors_zero_probabilities():
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    target = torch.tensor([1, 0])
    expected = -math.log(PROBABILITY_FLOOR) / 2  # one confidently wrong, one certain and right
    assert dwp.negative_log_likelihood(probs, target).item() == pytest.approx(expected)
    assert -math.log(PROBABILITY_FLOOR) == pytest.approx(15.94, abs=0.01)


def test_segmentation_shapes_and_class_dim():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(2, 3, 4, 5, 6, generator=g).softmax(1)  # (B, C, D, H, W)
    target = torch.randint(0, 3, (2, 4, 5, 6), generator=g)
    rows = probs.movedim(1, -1).reshape(-1, 3)
    flat = target.reshape(-1)
    for fn in (dwp.negative_log_likelihood, dwp.brier_score, dwp.expected_calibration_error):
        expected = fn(rows, flat).item()
        assert fn(probs, target).item() == pytest.approx(expected)
        assert fn(probs.movedim(1, -1), target, class_dim=-1).item() == pytest.approx(expected)


def test_nll_and_brier_match_sklearn_multiclass_and_binary():
    metrics = pytest.importorskip("sklearn.metrics")
    probs, target = _random_case(500, 4)
    assert dwp.negative_log_likelihood(probs, target).item() == pytest.approx(
        metrics.log_loss(target.numpy(), probs.numpy(), labels=[0, 1, 2, 3])
    )
    assert dwp.brier_score(probs, target).item() == pytest.approx(
        metrics.brier_score_loss(target.numpy(), probs.numpy(), labels=[0, 1, 2, 3])
    )
    probs, target = _random_case(500, 2, seed=1)
    p1 = probs[:, 1:]  # C == 1
    y, p = target.numpy(), p1[:, 0].numpy()
    assert dwp.negative_log_likelihood(p1, target).item() == pytest.approx(metrics.log_loss(y, p))
    # the sum over both classes: twice scikit-learn's (halved) binary Brier score
    assert dwp.brier_score(p1, target).item() == pytest.approx(2 * metrics.brier_score_loss(y, p))
    assert dwp.brier_score(p1, target).item() == pytest.approx(
        metrics.brier_score_loss(y, p, scale_by_half=False)
    )


@pytest.mark.parametrize(
    "fn", [dwp.negative_log_likelihood, dwp.brier_score, dwp.expected_calibration_error]
)
def test_bad_shapes_are_named(fn):
    with pytest.raises(ValueError, match=r"one \(class\) dimension more than target"):
        fn(PROBS, TARGET[None])
    with pytest.raises(ValueError, match="must have the shape of target"):
        fn(PROBS, TARGET[:2])


def test_labels_outside_the_classes_and_empty_input():
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1\]"):
        dwp.negative_log_likelihood(PROBS, torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="C == 1 is binary"):
        dwp.brier_score(PROBS[:, 1:], torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="no predictions"):
        dwp.brier_score(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


# ----------------------------------------------------------------------------- ECE


def test_ece_hand_computed():
    # confidences 0.9, 0.9 (one right, one wrong) and 0.6, 0.6 (both right), 10 bins:
    # bin (0.8, 0.9]: |0.5 - 0.9| * 2/4 = 0.2; bin (0.5, 0.6]: |1.0 - 0.6| * 2/4 = 0.2.
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    target = torch.tensor([0, 0, 0, 1])
    ece = dwp.expected_calibration_error(probs, target, n_bins=10)
    assert ece.item() == pytest.approx(0.4)
    # the same problem as binary probabilities of class 1 (C == 1)
    binary = dwp.expected_calibration_error(probs[:, 1:], target, n_bins=10)
    assert binary.item() == pytest.approx(0.4)


def test_ece_is_zero_for_calibrated_voxels_and_checks_shapes():
    # 4 voxels at confidence 0.75 of which 3 are right: perfectly calibrated
    probs = torch.tensor([0.75, 0.25]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    target = torch.tensor([[[0, 0], [0, 1]]])
    assert dwp.expected_calibration_error(probs, target).item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="class"):
        dwp.expected_calibration_error(probs, target[0])


def test_ece_is_still_importable_from_predict():
    from dwp.predict import expected_calibration_error

    assert expected_calibration_error is dwp.expected_calibration_error


# ----------------------------------------------------------------------------- AUROC


@pytest.mark.parametrize(
    ("uncertainty", "errors", "expected"),
    [
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),  # 3 of the 4 (wrong, right) pairs
        ([0.0, 0.1, 0.9, 1.0], [0, 0, 1, 1], 1.0),  # every error above every right one
        ([0.9, 1.0, 0.0, 0.1], [0, 0, 1, 1], 0.0),
        ([1.0, 1.0, 2.0, 2.0], [0, 1, 0, 1], 0.5),  # pairs: 1/2, 0, 1, 1/2 over 4
        ([0.0, 0.0, 0.0, 1.0], [1, 0, 0, 1], 0.75),  # pairs: 1/2, 1/2, 1, 1 over 4
        ([3.0, 3.0, 3.0, 3.0, 3.0], [1, 0, 0, 1, 0], 0.5),  # a constant score: all ties
    ],
)
def test_auroc_hand_computed_with_ties(uncertainty, errors, expected):
    u, e = torch.tensor(uncertainty), torch.tensor(errors, dtype=torch.bool)
    assert dwp.error_detection_auroc(u, e) == pytest.approx(expected)
    assert dwp.error_detection_auroc(u.flip(0), e.flip(0)) == pytest.approx(expected)


def test_auroc_is_nan_when_all_or_none_are_wrong():
    u = torch.tensor([0.1, 0.5, 0.2])
    assert math.isnan(dwp.error_detection_auroc(u, torch.zeros(3, dtype=torch.bool)))
    assert math.isnan(dwp.error_detection_auroc(u, torch.ones(3, dtype=torch.bool)))


def test_auroc_checks_its_inputs():
    with pytest.raises(ValueError, match="same shape"):
        dwp.error_detection_auroc(torch.zeros(3), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="non-finite"):
        dwp.error_detection_auroc(torch.tensor([0.0, math.nan]), torch.tensor([True, False]))


@pytest.mark.parametrize("decimals", [None, 1])  # continuous scores, and many ties
def test_auroc_matches_sklearn_on_many_voxels(decimals):
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(2)
    errors = torch.rand(20, 30, 40, generator=g) < 0.1  # a (D, H, W) volume
    uncertainty = torch.rand(20, 30, 40, generator=g) + 0.3 * errors  # informative
    if decimals is not None:
        uncertainty = uncertainty.round(decimals=decimals)
    expected = metrics.roc_auc_score(errors.flatten().numpy(), uncertainty.flatten().numpy())
    assert dwp.error_detection_auroc(uncertainty, errors) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------- all at once


def test_uncertainty_metrics_combines_the_scores():
    mi = torch.tensor([0.0, 0.3, 0.1])
    entropy = torch.tensor([0.3, 0.5, 0.7])
    scores = dwp.uncertainty_metrics(PROBS, TARGET, {"mi": mi, "entropy": entropy}, n_bins=10)
    assert set(scores) == {"accuracy", "nll", "brier", "ece", "auroc_mi", "auroc_entropy"}
    assert all(isinstance(v, float) for v in scores.values())
    # argmax [0, 1, 0] (a tie goes to class 0) against [0, 0, 1]: the last two are wrong
    assert scores["accuracy"] == pytest.approx(1 / 3)
    assert scores["nll"] == pytest.approx(dwp.negative_log_likelihood(PROBS, TARGET).item())
    assert scores["brier"] == pytest.approx(0.6)
    assert scores["ece"] == pytest.approx(
        dwp.expected_calibration_error(PROBS, TARGET, n_bins=10).item()
    )
    wrong = torch.tensor([False, True, True])
    assert scores["auroc_mi"] == pytest.approx(dwp.error_detection_auroc(mi, wrong))
    assert scores["auroc_mi"] == pytest.approx(1.0)  # 0.3 and 0.1 above the right one's 0.0
    assert scores["auroc_entropy"] == pytest.approx(1.0)


def test_uncertainty_metrics_binary_and_single_class():
    scores = dwp.uncertainty_metrics(PROBS[:, 1:], TARGET, {"u": torch.tensor([0.0, 1.0, 1.0])})
    assert scores["accuracy"] == pytest.approx(1 / 3)  # p > 0.5 is class 1; 0.5 is class 0
    assert scores["brier"] == pytest.approx(0.6)
    right = dwp.uncertainty_metrics(PROBS[:1], TARGET[:1], {"u": torch.tensor([0.2])})
    assert right["accuracy"] == 1.0 and math.isnan(right["auroc_u"])  # nothing is wrong


def test_uncertainty_metrics_names_a_map_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"uncertainties\['mi'\] has shape \(2,\)"):
        dwp.uncertainty_metrics(PROBS, TARGET, {"mi": torch.zeros(2)})
    with pytest.raises(ValueError, match="probs"):
        dwp.uncertainty_metrics(PROBS, TARGET[:, None], {})

"""Per-voxel uncertainty quality of one volume's prediction: hand-built volumes, the
uncertainty region, and the whole path from a network's prediction (plain and TTA)."""

import math

import pytest
import torch

import dwp
from dwp.predict import entropy
from unet3d import UNet3D
from unet3d.inference import VolumePrediction, predict_volume, predict_volume_tta
from unet3d.metrics import ROI_MARGIN, uncertainty_region, voxel_uncertainty

SHAPE = (8, 8, 8)
KEYS = {"accuracy", "nll", "brier", "ece", "auroc_mi", "auroc_entropy"}


def _volume(mi_of_error: float = 0.5) -> tuple[VolumePrediction, torch.Tensor]:
    """A 2x2x2 lesion predicted at p = 0.8, one false positive next to it at p = 0.6
    (the only voxel with mutual information), background at p(background) = 0.99."""
    label = torch.zeros(SHAPE, dtype=torch.long)
    label[3:5, 3:5, 3:5] = 1
    foreground = torch.full(SHAPE, 0.01)
    foreground[3:5, 3:5, 3:5] = 0.8
    foreground[3, 3, 5] = 0.6
    probs = torch.stack([1 - foreground, foreground])
    mi = torch.zeros(SHAPE)
    mi[3, 3, 5] = mi_of_error
    prediction = VolumePrediction(probs, probs.argmax(0), mi, entropy(probs, class_dim=0), 1)
    return prediction, label


def test_whole_volume_scores_by_hand():
    prediction, label = _volume()
    scores = voxel_uncertainty(prediction, label)
    assert set(scores) == {f"{k}_{s}" for k in KEYS for s in ("all", "roi")} | {"roi_fraction"}
    n = 512
    assert scores["accuracy_all"] == pytest.approx(1 - 1 / n)
    nll = (503 * -math.log(0.99) + 8 * -math.log(0.8) - math.log(0.4)) / n
    assert scores["nll_all"] == pytest.approx(nll, rel=1e-6)
    brier = (503 * 2 * 0.01**2 + 8 * 2 * 0.2**2 + 2 * 0.6**2) / n
    assert scores["brier_all"] == pytest.approx(brier, rel=1e-5)
    # the only wrong voxel is the most uncertain by both maps
    assert scores["auroc_mi_all"] == 1.0 and scores["auroc_entropy_all"] == 1.0


def test_roi_is_the_dilated_union_of_label_and_prediction():
    prediction, label = _volume()
    expected = torch.zeros(SHAPE, dtype=torch.bool)
    expected[2:6, 2:6, 2:6] = True  # the lesion, grown by one voxel
    expected[2:5, 2:5, 4:7] = True  # the false positive at (3, 3, 5), grown by one voxel
    region = uncertainty_region(prediction.mask, label, margin=1)
    assert torch.equal(region, expected)
    assert torch.equal(
        uncertainty_region(prediction.mask, label, margin=0), (label + prediction.mask) > 0
    )
    assert uncertainty_region(prediction.mask, label, margin=20).all()  # clipped at the borders
    scores = voxel_uncertainty(prediction, label, margin=1)
    assert scores["roi_fraction"] == pytest.approx(expected.sum().item() / 512)
    twin = dwp.uncertainty_metrics(
        prediction.probabilities[:, expected],
        label[expected],
        {
            "mi": prediction.mutual_information[expected],
            "entropy": prediction.predictive_entropy[expected],
        },
        class_dim=0,
    )
    assert {k: scores[f"{k}_roi"] for k in KEYS} == pytest.approx(twin)
    # the easy background drowns the error over the whole volume, not inside the region
    for metric in ("nll", "brier", "ece"):
        assert scores[f"{metric}_roi"] > 2 * scores[f"{metric}_all"], metric


def test_region_restricts_both_scores():
    prediction, label = _volume()
    half = torch.zeros(SHAPE, dtype=torch.bool)
    half[:, :, :5] = True  # leaves the false positive at (3, 3, 5) out
    scores = voxel_uncertainty(prediction, label[None], region=half)  # (1, D, H, W) label too
    assert scores["accuracy_all"] == 1.0 and math.isnan(scores["auroc_mi_all"])  # no error
    roi = uncertainty_region(prediction.mask, label) & half
    assert scores["roi_fraction"] == pytest.approx(roi.sum().item() / half.sum().item())
    assert scores["nll_all"] == pytest.approx(
        dwp.negative_log_likelihood(
            prediction.probabilities[:, half], label[half], class_dim=0
        ).item()
    )


def test_nothing_anywhere_leaves_the_region_empty():
    probs = torch.stack([torch.full(SHAPE, 0.9), torch.full(SHAPE, 0.1)])
    zeros = torch.zeros(SHAPE)
    prediction = VolumePrediction(probs, probs.argmax(0), zeros, entropy(probs, class_dim=0), 1)
    scores = voxel_uncertainty(prediction, torch.zeros(SHAPE, dtype=torch.long))
    assert scores["roi_fraction"] == 0.0
    assert all(math.isnan(scores[f"{k}_roi"]) for k in KEYS)
    assert scores["accuracy_all"] == 1.0 and scores["nll_all"] == pytest.approx(-math.log(0.9))


def test_bad_inputs_are_named():
    prediction, label = _volume()
    with pytest.raises(ValueError, match=r"label has shape \(8, 8, 4\)"):
        voxel_uncertainty(prediction, label[..., :4])
    with pytest.raises(ValueError, match="label must be a 3D label map"):
        voxel_uncertainty(prediction, label[0])
    with pytest.raises(ValueError, match=r"region has shape \(8, 8, 4\)"):
        voxel_uncertainty(prediction, label, region=torch.ones(8, 8, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="selects no voxel"):
        voxel_uncertainty(prediction, label, region=torch.zeros(SHAPE, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels must be in"):
        voxel_uncertainty(prediction, label * 2)
    with pytest.raises(ValueError, match="margin"):
        voxel_uncertainty(prediction, label, margin=-1)
    assert ROI_MARGIN == 3


def test_scores_of_a_network_prediction_plain_and_tta():
    pytest.importorskip("monai")
    torch.manual_seed(0)
    model = UNet3D(1, 2, widths=(2, 4, 4, 8))
    image = torch.rand(1, 16, 24, 16)
    label = torch.zeros(16, 24, 16, dtype=torch.long)
    label[5:10, 8:14, 5:9] = 1
    plain = voxel_uncertainty(predict_volume(model, image, roi_size=16), label)
    tta = voxel_uncertainty(predict_volume_tta(model, image, flips=(0, 2), roi_size=16), label)
    for scores in (plain, tta):
        assert 0 <= scores["accuracy_all"] <= 1 and scores["nll_all"] > 0
        assert 0 <= scores["ece_roi"] <= 1 and 0 < scores["roi_fraction"] <= 1
    # a deterministic network's mutual information is 0 everywhere: chance (all ties)
    assert plain["auroc_mi_all"] == 0.5
    assert tta["auroc_mi_all"] != 0.5  # the flips disagree

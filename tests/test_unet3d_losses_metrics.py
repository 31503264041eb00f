"""unet3d losses and metrics against hand-computed values, and the ELBO data term's scale."""

import math

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, MeanIoU

import dwp
from unet3d.losses import elbo_data_term, elbo_data_terms, paper_loss
from unet3d.metrics import SegmentationScores, evaluate, score_volume, voxel_spacing

SMOOTH = 1e-5  # MONAI's DiceLoss smooth_nr = smooth_dr


def _case(seed=0, batch=2, shape=(4, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, 2, *shape, generator=g)
    target = torch.randint(0, 2, (batch, *shape), generator=g)
    return logits, target


def _hand_ce(logits, target):
    """Per-voxel cross-entropy -log softmax(logits)[target], by hand."""
    log_p = logits - logits.logsumexp(dim=1, keepdim=True)
    return -log_p.gather(1, target.unsqueeze(1)).squeeze(1)


def _hand_dice_loss(logits, target):
    """Per-volume foreground soft Dice loss, by hand (with MONAI's smoothing)."""
    p = logits.softmax(dim=1)[:, 1].flatten(1)
    g = (target == 1).float().flatten(1)
    return 1 - (2 * (p * g).sum(1) + SMOOTH) / (p.sum(1) + g.sum(1) + SMOOTH)


# ----------------------------------------------------------------------------- losses


def test_paper_loss_is_mean_ce_plus_dice_by_hand():
    logits, target = _case()
    loss = paper_loss()
    assert isinstance(loss, DiceCELoss)
    expected = 0.01 * _hand_ce(logits, target).mean() + _hand_dice_loss(logits, target).mean()
    torch.testing.assert_close(loss(logits, target), expected)
    torch.testing.assert_close(loss(logits, target.unsqueeze(1)), expected)  # (B, 1, ...) too
    weighted = paper_loss(ce_weight=0.5, dice_weight=2.0)(logits, target)
    expected = 0.5 * _hand_ce(logits, target).mean() + 2.0 * _hand_dice_loss(logits, target).mean()
    torch.testing.assert_close(weighted, expected)


def test_elbo_data_term_is_summed_ce_plus_dice_per_voxel_by_hand():
    logits, target = _case(seed=1, batch=3)
    voxels = target[0].numel()
    ce = _hand_ce(logits, target).sum()
    dice = _hand_dice_loss(logits, target).sum()
    expected = 0.01 * ce + 1.0 * voxels * dice
    torch.testing.assert_close(elbo_data_term(logits, target), expected)
    torch.testing.assert_close(elbo_data_term(logits, target.unsqueeze(1)), expected)
    parts = elbo_data_terms(logits, target, ce_weight=1.0, dice_weight=0.5)
    torch.testing.assert_close(parts.ce, ce)
    torch.testing.assert_close(parts.dice, dice)
    torch.testing.assert_close(parts.total, ce + 0.5 * voxels * dice)
    # Float labels with whole values (as MONAI loaders give) are accepted.
    torch.testing.assert_close(elbo_data_term(logits, target.float()), expected)
    # The data term reaches every logit.
    logits.requires_grad_(True)
    elbo_data_term(logits, target).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert (logits.grad != 0).all()


def test_elbo_data_term_is_the_paper_loss_summed_over_voxels_and_volumes():
    """The Bayesian and deterministic strategies fit the same data objective: with the
    default weights the ELBO's data term is MONAI's mean-reduced DiceCELoss (the paper's
    loss) times batch x voxels, its gradient too.  A weaker Dice term traps runs in an
    all-background prediction (unet3d.losses)."""
    logits, target = _case(seed=4, batch=3, shape=(4, 5, 6))
    logits.requires_grad_(True)
    summed = elbo_data_term(logits, target)
    mean = paper_loss()(logits, target)
    torch.testing.assert_close(summed, target.numel() * mean)
    (g_summed,) = torch.autograd.grad(summed, logits)
    (g_mean,) = torch.autograd.grad(mean, logits)
    torch.testing.assert_close(g_summed, target.numel() * g_mean)
    # the weights pass through alike
    torch.testing.assert_close(
        elbo_data_term(logits, target, ce_weight=0.3, dice_weight=2.0),
        target.numel() * paper_loss(0.3, 2.0)(logits, target),
    )


def test_elbo_data_term_scales_with_voxels_and_batch_while_paper_loss_does_not():
    """The pitfall note's scale test: the ELBO's data term must grow with the voxel count,
    both parts alike (the Dice part is weighted per voxel)."""
    logits, target = _case(seed=2, batch=2, shape=(4, 4, 4))
    # Every volume twice as large (its voxels duplicated along D): same per-voxel statistics.
    big_logits, big_target = torch.cat([logits, logits], dim=2), torch.cat([target, target], dim=1)
    small, big = elbo_data_terms(logits, target), elbo_data_terms(big_logits, big_target)
    torch.testing.assert_close(big.ce, 2 * small.ce)  # summed CE doubles
    torch.testing.assert_close(big.dice, small.dice, rtol=1e-4, atol=1e-6)  # Dice is per volume
    torch.testing.assert_close(big.total, 2 * small.total, rtol=1e-4, atol=1e-6)
    # The mean-reduced paper loss does not see the volume size at all.
    loss = paper_loss()
    torch.testing.assert_close(
        loss(big_logits, big_target), loss(logits, target), rtol=1e-4, atol=0
    )
    # Summed CE = mean CE x (batch x voxels): the factor a mean-reduced ELBO would lose.
    mean_ce = torch.nn.functional.cross_entropy(logits, target)
    torch.testing.assert_close(small.ce, mean_ce * target.numel())
    # Twice the batch doubles the whole term; dwp.elbo then scales it by N / B.
    double = elbo_data_terms(torch.cat([logits, logits]), torch.cat([target, target]))
    torch.testing.assert_close(double.total, 2 * small.total)
    terms = dwp.elbo(small.total, n_data=10, batch_size=2, kl_value=torch.tensor(0.0))
    torch.testing.assert_close(terms.data_term, 5 * small.total)


def test_elbo_dice_keeps_its_share_of_the_gradient_as_volumes_grow():
    """The all-background trap (unet3d.losses docstring): weighted per volume, the Dice
    term's gradient shrinks like 1 / voxels next to the summed CE's; weighted per voxel, the
    ratio of the two gradients on the foreground logits does not depend on the volume size."""

    def grad_ratio(dice_per_voxel: bool, copies: int) -> float:
        logits, target = _case(seed=3, batch=1, shape=(4, 4, 4))
        logits = torch.cat([logits] * copies, dim=2).requires_grad_(True)
        target = torch.cat([target] * copies, dim=1)
        voxels = target[0].numel()
        weight = 1e-3 if dice_per_voxel else 1.0 / voxels  # same total weight on one copy...
        parts = elbo_data_terms(logits, target, ce_weight=0.01, dice_weight=weight)
        (g_ce,) = torch.autograd.grad(0.01 * parts.ce, logits, retain_graph=True)
        (g_dice,) = torch.autograd.grad(weight * voxels * parts.dice, logits)
        return float(g_dice[:, 1].norm() / g_ce[:, 1].norm())

    for per_voxel in (True, False):
        ratios = [grad_ratio(per_voxel, k) for k in (1, 2, 4)]
        if per_voxel:
            assert ratios[2] == pytest.approx(ratios[0], rel=1e-3)
        else:  # ...a fixed weight per volume: the Dice share falls like 1 / voxels
            assert ratios[2] == pytest.approx(ratios[0] / 4, rel=1e-3)


@pytest.mark.parametrize("fn", [elbo_data_term, lambda x, y: paper_loss()(x, y)])
def test_losses_reject_bad_inputs(fn):
    logits, target = _case()
    with pytest.raises(ValueError, match="does not match"):
        fn(logits, target[:, :, :, :3])
    with pytest.raises(ValueError, match="does not match"):
        fn(logits, target[:1])
    bad = target.clone()
    bad[0, 0, 0, 0], bad[1, 0, 0, 0] = 2, -1
    with pytest.raises(ValueError, match=r"\{0, \.\.\., 1\}.*got -1, 2"):
        fn(logits, bad)
    half = target.float()
    half[0, 0, 0, 0] = 0.5
    with pytest.raises(ValueError, match=r"got 0\.5"):
        fn(logits, half)
    nan_logits = logits.clone()
    nan_logits[0, 1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 NaN"):
        fn(nan_logits, target)
    with pytest.raises(ValueError, match="C >= 2"):
        fn(logits[:, :1], target)


def test_value_checks_follow_dwp_validation_switch():
    logits, target = _case()
    bad = target.clone()
    bad[0, 0, 0, 0] = 1
    logits[0, 0, 0, 0, 0] = float("nan")
    dwp.set_validation(False)
    try:
        assert torch.isnan(elbo_data_term(logits, bad))  # no check, NaN propagates
    finally:
        dwp.set_validation(True)
    with pytest.raises(ValueError, match="NaN"):
        elbo_data_term(logits, bad)


# ---------------------------------------------------------------------------- metrics


def _box(slices, shape=(4, 4, 4)):
    m = torch.zeros(shape, dtype=torch.long)
    m[slices] = 1
    return m


def test_dice_iou_hd95_hand_computed_and_empty_cases():
    # Volume 0: two 2x2x2 boxes shifted by one voxel along axis 0: |A| = |B| = 8, |A n B| = 4.
    pred0, lab0 = _box(np.s_[0:2, 0:2, 0:2]), _box(np.s_[1:3, 0:2, 0:2])
    # Volume 1: a perfect match. Volume 2: both empty. Volume 3: prediction misses the label.
    pred1 = lab1 = _box(np.s_[0, 0, 0:3])
    empty = torch.zeros(4, 4, 4, dtype=torch.long)
    preds, labels = [pred0, pred1, empty, empty], [lab0, lab1, empty, lab0]
    out = evaluate(preds, labels, spacing=(2.0, 1.0, 1.0))

    dice = [2 * 4 / (8 + 8), 1.0, 1.0, 0.0]
    iou = [4 / 12, 1.0, 1.0, 0.0]
    assert out["dice"] == pytest.approx(dice, abs=1e-6)
    assert out["iou"] == pytest.approx(iou, abs=1e-6)
    assert out["dice_mean"] == pytest.approx(np.mean(dice)) and out["dice_mean"] == 0.625
    assert out["dice_std"] == pytest.approx(np.std(dice))
    assert out["iou_mean"] == pytest.approx(np.mean(iou))
    assert out["iou_std"] == pytest.approx(np.std(iou))
    # HD95 of volume 0: every voxel of each box is a surface voxel; half of them lie one voxel
    # (2 mm along axis 0) from the other box, so the 95th percentile both ways is 2 mm.
    assert out["hd95"][:2] == pytest.approx([2.0, 0.0])
    assert math.isnan(out["hd95"][2]) and math.isnan(out["hd95"][3])
    assert out["hd95_mean"] == pytest.approx(1.0) and out["hd95_std"] == pytest.approx(1.0)
    assert (out["hd95_n_valid"], out["hd95_n_excluded"], out["hd95_unit"]) == (2, 2, "mm")
    assert (out["n_volumes"], out["n_empty_label"], out["n_empty_prediction"]) == (4, 1, 2)
    assert out["n_both_empty"] == 1
    # Without spacing HD95 is in voxels; a stacked (N, 1, D, H, W) tensor works too.
    stacked = evaluate(torch.stack(preds)[:, None], torch.stack(labels)[:, None])
    assert stacked["hd95"][:2] == pytest.approx([1.0, 0.0]) and stacked["hd95_unit"] == "voxel"
    assert stacked["dice"] == out["dice"]
    # Label empty, prediction not: a false alarm scores 0.
    assert score_volume(pred0, empty)["dice"] == 0.0


def test_reported_empty_cases_agree_with_monai_ignore_empty_false():
    def one_hot(m):
        return torch.stack([1 - m, m]).unsqueeze(0).float()

    full, empty = _box(np.s_[1:3, 1:3, 1:3]), torch.zeros(4, 4, 4, dtype=torch.long)
    for p, y in [(empty, empty), (empty, full), (full, empty), (full, full)]:
        ours = score_volume(p, y)
        dice = DiceMetric(include_background=False, ignore_empty=False)(one_hot(p), one_hot(y))
        iou = MeanIoU(include_background=False, ignore_empty=False)(one_hot(p), one_hot(y))
        assert ours["dice"] == pytest.approx(dice.item())
        assert ours["iou"] == pytest.approx(iou.item())


def test_hd95_anisotropic_spacing_single_voxels():
    # Two single-voxel objects, offsets (1, 2, 0) voxels apart.
    a, b = _box(np.s_[1, 1, 1], (5, 5, 5)), _box(np.s_[2, 3, 1], (5, 5, 5))
    assert score_volume(a, b, spacing=(1.0, 2.0, 3.0))["hd95"] == pytest.approx(math.sqrt(1 + 16))
    assert score_volume(a, b, spacing=(3.0, 2.0, 1.0))["hd95"] == pytest.approx(5.0)  # 3-4-5
    assert score_volume(a, b)["hd95"] == pytest.approx(math.sqrt(5))
    # The spacing may come from the affine, here a rotated one with voxel sizes (3, 2, 1).
    c, s = math.cos(0.3), math.sin(0.3)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([3.0, 2.0, 1.0])
    assert voxel_spacing(affine) == pytest.approx((3.0, 2.0, 1.0))
    assert score_volume(a, b, spacing=affine)["hd95"] == pytest.approx(5.0)
    # One spacing per volume.
    out = evaluate([a, a], [b, b], spacing=[(1.0, 2.0, 3.0), (3.0, 2.0, 1.0)])
    assert out["hd95"] == pytest.approx([math.sqrt(17), 5.0])


def test_segmentation_scores_dataclass():
    scores = SegmentationScores(dice=[0.5, 1.0], iou=[1 / 3, 1.0], hd95=[2.0, math.nan])
    assert scores.dice_mean == 0.75 and scores.dice_std == 0.25
    assert scores.hd95_mean == 2.0 and scores.hd95_n_excluded == 1
    assert "Dice 0.750 +- 0.250" in scores.summary() and "1 excluded" in scores.summary()
    assert scores.as_dict()["n_volumes"] == 2


def test_metrics_reject_bad_inputs():
    a = _box(np.s_[0:2, 0:2, 0:2])
    with pytest.raises(ValueError, match=r"binary.*got values 2"):
        evaluate([a * 2], [a])
    with pytest.raises(ValueError, match="does not match"):
        evaluate([a], [a[:3]])
    with pytest.raises(ValueError, match="1 predictions for 2 labels"):
        evaluate([a], [a, a])
    with pytest.raises(ValueError, match="spacing"):
        evaluate([a], [a], spacing=(1.0, 2.0))
    with pytest.raises(ValueError, match="> 0"):
        evaluate([a], [a], spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="one 3D volume"):
        evaluate(a, a)


def test_bad_target_labels_are_listed_once_each():
    from unet3d.losses import check_segmentation_inputs

    logits = torch.zeros(1, 3, 2, 2, 2)
    good = torch.tensor([0, 1, 2, 1, 0, 2, 1, 0]).reshape(1, 2, 2, 2)
    assert torch.equal(check_segmentation_inputs(logits, good.float()), good)
    bad = torch.tensor([0.0, 3.0, 0.5, 3.0, -1.0, 1.0, 0.5, 2.0]).reshape(1, 2, 2, 2)
    with pytest.raises(ValueError, match=r"in \{0, \.\.\., 2\} for 3 classes, got -1, 0\.5, 3$"):
        check_segmentation_inputs(logits, bad)
    with pytest.raises(ValueError, match="got nan"):
        check_segmentation_inputs(logits, torch.full((1, 2, 2, 2), float("nan")))

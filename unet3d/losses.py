"""Segmentation losses of the ``unet3d`` application: the paper's loss and the ELBO data term.

Kuzina et al. (2019) train the 3D U-Net on ``0.01 * BCE + Dice``.  The network has two
output channels (background, foreground) and a softmax, so the "BCE" is the two-class
cross-entropy, i.e. the binary cross-entropy of ``sigmoid(logit_1 - logit_0)``.  The loss
comes in two reductions, one for each family of training strategies:

* :func:`paper_loss` -- **deterministic** strategies (RI: random init, PR: pretrained
  init, PRf: pretrained and frozen).  A :class:`monai.losses.DiceCELoss` with its default
  *mean* reductions: ``ce_weight * mean-over-voxels CE + dice_weight * mean-over-volumes
  Dice loss``.  For a point estimate only the direction of the gradient matters, so the
  mean is fine (and keeps the learning rate independent of the volume size).

* :func:`elbo_data_term` -- **Bayesian** strategies (N(0, 1) prior, DWP, ...).  The ELBO
  adds the data term to a KL *summed over every weight* (about 26,000 3x3x3 kernels in the
  reference U-Net), so the data term must be *summed over every voxel*
  (:mod:`dwp.likelihoods`).  A mean-reduced CE is smaller by the voxel count (10^5 - 10^6
  per volume) and the KL swamps it: the posterior collapses to the prior (see
  ``shared/notes/dwp-method.md``, "Pitfalls measured here").  The data term is the paper's
  loss *summed* instead of averaged: every voxel carries its cross-entropy and an equal
  share of its volume's Dice loss::

      sum_{volumes} sum_{voxels} [ce_weight * CE(voxel) + dice_weight * DiceLoss(volume)]
        = ce_weight * sum CE  +  dice_weight * sum_{volumes} n_voxels * DiceLoss(volume)

  With the defaults (``ce_weight = 0.01``, ``dice_weight = 1``) this is exactly
  ``batch * voxels * paper_loss()``: the Bayesian and the deterministic strategies fit the
  same data objective, and only the KL sets them apart.  :func:`dwp.elbo` multiplies it by
  ``n_data / batch_size``, which turns both sums (over the minibatch's volumes) into
  unbiased estimates of the sums over the whole training set.  ``ce_weight`` acts as a
  likelihood temperature (``ce_weight=1``, ``dice_weight=0``: the exact categorical
  likelihood); the Dice term is a shape term, not a log-likelihood.

The all-background trap
-----------------------
Why the default Dice weight is the paper's, and why the benchmarks give the U-Net an
output bias. The reference output block is ``InstanceNorm -> ReLU -> 1x1x1 conv`` without
bias, so the foreground-minus-background logit is ``sum_c (w_fg,c - w_bg,c) * relu(h_c)``.
A net can fall into a state in which every channel that votes for foreground is switched
off in the lesion: the foreground probability there is then at most 0.5 (0.500 exactly in
trapped runs, whose soft Dice sits at its ceiling of 2/3), the argmax predicts no lesion
(validation Dice 0 at every validation), and no gradient reaches the dead units to bring
them back. The KL is not the cause: a trapped run with the KL weight at 0 stays trapped.
The transfer benchmark (``full`` preset, 120 Bayesian runs per setting, tuning and grid)
measured it. With a Dice weight of 1e-3 per voxel (Dice and CE parts about equal at the
start of training) 8 runs were trapped, all grid runs. With ``dice_weight = 1`` (the
paper's balance, the default: Bayesian and deterministic strategies then fit one data
objective) 16 were: 1 of 80 grid runs, but 15 of the 20 candidates of the far regime's
tuning cell. The Dice weight moves the trap; it does not remove it.
``UNet3D(out_bias=True)`` (``unet3d train --out-bias``) does: with a bias, a silent
feature map means whichever class the bias says. With it, for every method, the same
preset had 0 of 240 runs with validation Dice 0 (120 Bayesian, 120 deterministic, tuning
included; 16 and 0 before; the far tuning cell 0 of 20). A CE-dominated term gives
better-calibrated probabilities (per-voxel NLL 0.17 against 0.28, near, 5 volumes, without
the bias) at the cost of the one-objective comparison.

Dice and the background
-----------------------
Both losses use ``include_background=False`` by default: the Dice loss is computed on the
foreground channel only (the reported metric is the foreground Dice too).  With a small
lesion the background Dice is ~1 whatever the network does, so including it would halve
the Dice gradient on the lesion and hide it behind a near-constant term.  The
cross-entropy always uses both channels (the softmax needs them).  Pass
``include_background=True`` to reproduce MONAI's default.

Targets
-------
Integer label maps ``(B, D, H, W)`` or ``(B, 1, D, H, W)`` with values in
``{0, ..., C - 1}`` (``{0, 1}`` for the paper's two classes); floating targets are accepted
when their values are whole numbers (MONAI's loaders return floats).  Logits are
``(B, C, D, H, W)``, before the softmax.  Shapes are always checked; the value checks (NaN
logits, labels out of range) follow :func:`dwp.set_validation`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dwp.extras import from_extra
from dwp.likelihoods import categorical_nll
from dwp.settings import validation_enabled

with from_extra("unet3d", needed_by="unet3d.losses"):  # MONAI is not in the core install
    from monai.losses import DiceCELoss, DiceLoss

__all__ = [
    "DataTerm",
    "PaperLoss",
    "check_segmentation_inputs",
    "elbo_data_term",
    "elbo_data_terms",
    "paper_loss",
]


def check_segmentation_inputs(logits: Tensor, target: Tensor) -> Tensor:
    """Validate ``logits`` ``(B, C, *spatial)`` and ``target``; return it as ``(B, *spatial)`` int64.

    Raises :class:`ValueError` on a shape mismatch, on labels outside ``{0, ..., C - 1}``
    or non-integer labels (the offending values are named), and on NaN logits.  The value
    checks are skipped under ``dwp.set_validation(False)``.
    """
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"logits and target must be tensors, got {type(logits).__name__} and "
            f"{type(target).__name__}"
        )
    if logits.dim() < 3:
        raise ValueError(
            f"logits must be (B, C, *spatial) with C >= 2 classes, got shape {tuple(logits.shape)}"
        )
    if not torch.is_floating_point(logits):
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    n_classes = logits.shape[1]
    if n_classes < 2:
        raise ValueError(
            f"logits need one channel per class (C >= 2, softmax), got C = {n_classes} in "
            f"shape {tuple(logits.shape)}"
        )
    expected = (logits.shape[0], *logits.shape[2:])
    if target.dim() == logits.dim() and target.shape[1] == 1:
        target = target[:, 0]
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}: "
            f"expected {expected} or {(expected[0], 1, *expected[1:])}"
        )
    if validation_enabled():
        if torch.isnan(logits).any():
            n_nan = int(torch.isnan(logits).sum())
            raise ValueError(
                f"logits contain {n_nan} NaN value(s): check the input batch and the network "
                f"for divergence (dwp.set_validation(False) skips this check)"
            )
        # one elementwise pass and one reduction (torch.unique would sort every voxel);
        # the distinct bad values are looked up only for the message
        invalid = (target < 0) | (target >= n_classes)
        if torch.is_floating_point(target):
            invalid |= target != target.round()  # also catches NaN
        if invalid.any():
            bad = torch.unique(target[invalid])
            shown = ", ".join(f"{v:g}" for v in bad[:10].tolist())
            more = f" (and {bad.numel() - 10} more)" if bad.numel() > 10 else ""
            raise ValueError(
                f"target labels must be integers in {{0, ..., {n_classes - 1}}} for "
                f"{n_classes} classes, got {shown}{more}"
            )
    return target.long()


class PaperLoss(DiceCELoss):
    """:class:`monai.losses.DiceCELoss` that validates its inputs and accepts ``(B, *spatial)`` targets.

    Built by :func:`paper_loss`; call it as ``loss(logits, target)``.
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        target = check_segmentation_inputs(input, target)
        return super().forward(input, target.unsqueeze(1))


def paper_loss(
    ce_weight: float = 0.01, dice_weight: float = 1.0, *, include_background: bool = False
) -> PaperLoss:
    """The paper's deterministic loss ``ce_weight * CE + dice_weight * Dice`` (RI / PR / PRf).

    A :class:`monai.losses.DiceCELoss` (subclass :class:`PaperLoss`) with ``softmax=True``,
    ``to_onehot_y=True``, ``lambda_ce=ce_weight``, ``lambda_dice=dice_weight`` and mean
    reductions: CE averaged over voxels and volumes, foreground Dice loss computed per
    volume and averaged over the batch (MONAI's default smoothing ``1e-5``).  Not for the
    Bayesian ELBO: use :func:`elbo_data_term` there (summed reductions).
    """
    if ce_weight < 0 or dice_weight < 0:
        raise ValueError(f"loss weights must be >= 0, got ce {ce_weight}, dice {dice_weight}")
    return PaperLoss(
        include_background=include_background,
        to_onehot_y=True,
        softmax=True,
        reduction="mean",
        lambda_ce=float(ce_weight),
        lambda_dice=float(dice_weight),
    )


class DataTerm(NamedTuple):
    """The ELBO data term and its two parts (for logging them apart)."""

    total: Tensor
    """``ce_weight * ce + dice_weight * voxels * dice`` (``voxels`` per volume): pass it to
    :func:`dwp.elbo` as ``nll``."""
    ce: Tensor
    """Cross-entropy summed over voxels and volumes (unweighted, nats)."""
    dice: Tensor
    """Per-volume foreground Dice loss summed over the volumes (unweighted)."""


def elbo_data_terms(
    logits: Tensor,
    target: Tensor,
    ce_weight: float = 0.01,
    dice_weight: float = 1.0,
    *,
    include_background: bool = False,
) -> DataTerm:
    """:func:`elbo_data_term` with its parts: ``DataTerm(total, ce, dice)``."""
    if ce_weight < 0 or dice_weight < 0:
        raise ValueError(f"loss weights must be >= 0, got ce {ce_weight}, dice {dice_weight}")
    target = check_segmentation_inputs(logits, target)
    ce = categorical_nll(logits, target)
    dice_fn = DiceLoss(
        include_background=include_background, to_onehot_y=True, softmax=True, reduction="none"
    )
    per_volume = dice_fn(logits, target.unsqueeze(1)).flatten(1).mean(1)  # mean over classes
    dice = per_volume.sum()
    voxels = target[0].numel()
    return DataTerm(total=ce_weight * ce + dice_weight * voxels * dice, ce=ce, dice=dice)


def elbo_data_term(
    logits: Tensor,
    target: Tensor,
    ce_weight: float = 0.01,
    dice_weight: float = 1.0,
    *,
    include_background: bool = False,
) -> Tensor:
    """Data term of the Bayesian strategies: the minibatch's loss **summed**, never averaged.

    ``ce_weight * sum CE + dice_weight * sum_volumes voxels * DiceLoss``: the CE summed over
    every voxel of every volume (:func:`dwp.likelihoods.categorical_nll`), and the
    foreground Dice loss of each volume counted once per voxel, so that neither part
    vanishes next to the other whatever the volume size.  With the default weights it
    equals ``batch * voxels * paper_loss()(logits, target)``.  Pass it as ``nll`` to
    ``dwp.elbo(nll, model, n_data=N, batch_size=B)``, which scales it by ``N / B`` to the
    whole training set (see the module docstring for why the sums matter).

    Parameters
    ----------
    logits
        ``(B, C, D, H, W)`` network outputs before the softmax.
    target
        ``(B, D, H, W)`` or ``(B, 1, D, H, W)`` labels in ``{0, ..., C - 1}``.
    ce_weight, dice_weight
        Weights per voxel of its cross-entropy and of its volume's Dice loss: the paper's
        0.01 and 1 (as in :func:`paper_loss`).  Neither this nor a weaker Dice weight keeps
        every run out of the all-background trap (module docstring).
    include_background
        Also count the background channel in the Dice loss (averaged over classes).
    """
    return elbo_data_terms(
        logits, target, ce_weight, dice_weight, include_background=include_background
    ).total

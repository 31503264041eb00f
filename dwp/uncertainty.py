"""The quality of predictive probabilities and of uncertainty maps, as numbers.

Every function scores ``N`` predictions at once: the rows of a classifier's batch, or the
voxels of segmentations (``probs`` ``(B, C, *)`` against ``target`` ``(B, *)``: every
voxel is one prediction).  ``C == 1`` means the probability of the positive class of a
binary problem; it is scored as the two-class problem ``(1 - p, p)``, so the binary and
the two-class forms of the same probabilities give the same numbers.

* :func:`negative_log_likelihood`: ``mean_i -log p_i[y_i]``;
* :func:`brier_score`: ``mean_i sum_c (p_ic - [y_i = c])^2``;
* :func:`expected_calibration_error`: top-label ECE with equal-width bins;
* :func:`error_detection_auroc`: how well an uncertainty map ranks the wrong predictions
  (``argmax_c p_ic != y_i``) above the right ones;
* :func:`uncertainty_metrics`: all of them at once, for several uncertainty maps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = [
    "PROBABILITY_FLOOR",
    "brier_score",
    "error_detection_auroc",
    "expected_calibration_error",
    "negative_log_likelihood",
    "uncertainty_metrics",
]

#: Probabilities are clamped to at least this before the log of the NLL: float32's
#: machine epsilon.  A float32 ``1 - p`` near 0 is resolved only to this step (so a smaller
#: value is rounding, not evidence), and it caps one confidently wrong prediction at
#: ``-log(eps) = 15.9`` nats, so a few such voxels cannot outweigh millions of others.
#: scikit-learn's ``log_loss`` clips float32 input at the same value.
PROBABILITY_FLOOR = float(torch.finfo(torch.float32).eps)


def _rows(probs: Tensor, target: Tensor, class_dim: int) -> tuple[Tensor, Tensor]:
    """``(N, C)`` float64 probabilities (``C >= 2``) and ``(N,)`` int64 labels on CPU:
    the class dimension moved last, every other position one prediction; binary
    ``C == 1`` probabilities of the positive class stacked with their complement."""
    if probs.dim() != target.dim() + 1:
        raise ValueError(
            f"probs {tuple(probs.shape)} must have one (class) dimension more than target "
            f"{tuple(target.shape)}"
        )
    p = probs.detach().movedim(class_dim, -1).cpu().double()
    if p.shape[:-1] != target.shape:
        raise ValueError(
            f"probs {tuple(probs.shape)} without its class dimension {class_dim} must have "
            f"the shape of target {tuple(target.shape)}"
        )
    if p.shape[-1] == 1:  # binary: the probability of class 1; stack class 0
        p = torch.cat([1 - p, p], dim=-1)
    # contiguous rows: reductions over C of a column-major (N, C) are ~10x slower
    return p.reshape(-1, p.shape[-1]).contiguous(), target.detach().cpu().long().reshape(-1)


def _nll(p: Tensor, y: Tensor) -> Tensor:
    """Per prediction ``-log max(p[y], floor)`` of :func:`_rows`' rows."""
    return -p.gather(1, y[:, None])[:, 0].clamp_min(PROBABILITY_FLOOR).log()


def _brier(p: Tensor, y: Tensor) -> Tensor:
    """Per prediction ``sum_c (p_c - [y = c])^2`` of :func:`_rows`' rows."""
    return (p - torch.nn.functional.one_hot(y, p.shape[1]).double()).square().sum(1)


def _ece(p: Tensor, y: Tensor, n_bins: int) -> Tensor:
    """The ECE of :func:`_rows`' rows (see :func:`expected_calibration_error`)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    confidence, predicted = p.max(dim=1)
    correct = (predicted == y).double()
    # bin b holds confidences in ((b-1)/M, b/M]; confidence 0 cannot occur for top labels
    bins = (confidence * n_bins).ceil().clamp(1, n_bins).long() - 1
    sum_conf = torch.bincount(bins, weights=confidence, minlength=n_bins)
    sum_acc = torch.bincount(bins, weights=correct, minlength=n_bins)
    return (sum_acc - sum_conf).abs().sum() / confidence.numel()


def _labelled_rows(probs: Tensor, target: Tensor, class_dim: int) -> tuple[Tensor, Tensor]:
    """:func:`_rows`, with the labels checked and at least one prediction."""
    p, y = _rows(probs, target, class_dim)
    n_classes = p.shape[1]
    if not y.numel():
        raise ValueError("no predictions to score (target is empty)")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(
            f"target labels must be in [0, {n_classes - 1}] for {n_classes} classes "
            f"(C == 1 is binary: labels 0 and 1), got values in "
            f"[{int(y.min())}, {int(y.max())}]"
        )
    return p, y


def negative_log_likelihood(probs: Tensor, target: Tensor, class_dim: int = 1) -> Tensor:
    """Mean negative log-likelihood of the labels (the cross-entropy of probabilities).

    ``NLL = (1 / N) sum_i -log max(p_i[y_i], floor)`` with ``floor`` =
    :data:`PROBABILITY_FLOOR`, in nats.

    Parameters
    ----------
    probs
        Class probabilities ``(N, C, *)`` (classes along ``class_dim``); ``C == 1`` is the
        probability of class 1 of a binary problem.
    target
        Integer labels ``(N, *)`` in ``[0, C)`` (``{0, 1}`` when ``C == 1``).
    class_dim
        Dimension of the classes in ``probs``.

    Returns
    -------
    Tensor
        Scalar >= 0, in the dtype of ``probs`` (computed in float64).
    """
    p, y = _labelled_rows(probs, target, class_dim)
    return _nll(p, y).mean().to(probs.dtype)


def brier_score(probs: Tensor, target: Tensor, class_dim: int = 1) -> Tensor:
    """Mean Brier score: the squared distance of the probabilities to the one-hot label.

    ``Brier = (1 / N) sum_i sum_c (p_ic - [y_i = c])^2``, in ``[0, 2]``.  Binary
    ``C == 1`` probabilities are scored as the two classes ``(1 - p, p)``, which gives
    ``2 (p - y)^2``: twice scikit-learn's binary ``brier_score_loss`` (that is its
    ``scale_by_half`` convention), equal to its multiclass form.

    Parameters
    ----------
    probs, target, class_dim
        As in :func:`negative_log_likelihood`.

    Returns
    -------
    Tensor
        Scalar in ``[0, 2]``, in the dtype of ``probs``.
    """
    p, y = _labelled_rows(probs, target, class_dim)
    return _brier(p, y).mean().to(probs.dtype)


def expected_calibration_error(
    probs: Tensor, target: Tensor, n_bins: int = 15, class_dim: int = 1
) -> Tensor:
    """Top-label expected calibration error (Guo et al. 2017), equal-width bins.

    ECE = sum_b (n_b / n) * |accuracy_b - confidence_b| over the bins ``((b-1)/M, b/M]``
    of confidence ``max_c p_c``.  Every voxel of a segmentation counts as one prediction.

    Parameters
    ----------
    probs
        Class probabilities ``(N, C, *)``; ``C == 1`` means the probability of the positive
        class of a binary problem.
    target
        Integer labels ``(N, *)``.
    n_bins
        Number of confidence bins ``M``.
    class_dim
        Dimension of the classes in ``probs``.

    Returns
    -------
    Tensor
        Scalar in ``[0, 1]``, in the dtype of ``probs``.
    """
    p, y = _rows(probs, target, class_dim)
    return _ece(p, y, n_bins).to(probs.dtype)


def error_detection_auroc(uncertainty: Tensor, errors: Tensor) -> float:
    """AUROC of an uncertainty score as a detector of the wrong predictions.

    The probability that a wrong prediction, drawn at random, is more uncertain than a
    right one (ties count one half): the Mann-Whitney statistic

    ``AUROC = (R_1 - n_1 (n_1 + 1) / 2) / (n_1 n_0)``,

    with ``R_1`` the sum of the ranks of the ``n_1`` wrong predictions among all ``n``
    (tied scores share their average rank) and ``n_0 = n - n_1``.  1: every error is
    more uncertain than every right prediction; 0.5: no better than chance (a constant
    score, e.g. the zero mutual information of a deterministic network, gives exactly
    0.5).  One sort, ``O(n log n)``, in float64 on CPU (the rank sums stay exact integers
    or halves up to ``n ~ 10^8``).

    Parameters
    ----------
    uncertainty
        Scores of any shape, higher = more uncertain; finite.
    errors
        Same shape: True (or nonzero) where the prediction is wrong.

    Returns
    -------
    float
        In ``[0, 1]``; ``nan`` when all or none of the predictions are wrong (the AUROC
        compares errors with right predictions, so one of the two groups is missing).
    """
    if uncertainty.shape != errors.shape:
        raise ValueError(
            f"uncertainty {tuple(uncertainty.shape)} and errors {tuple(errors.shape)} must "
            "have the same shape"
        )
    score = uncertainty.detach().reshape(-1).cpu().double()
    wrong = errors.detach().reshape(-1).cpu().bool()
    if not torch.isfinite(score).all():
        raise ValueError("uncertainty has non-finite values (nan or inf)")
    n_wrong = int(wrong.sum())
    n_right = wrong.numel() - n_wrong
    if n_wrong == 0 or n_right == 0:
        return math.nan
    sorted_score, order = torch.sort(score)
    _, group, counts = torch.unique_consecutive(
        sorted_score, return_inverse=True, return_counts=True
    )
    last = counts.cumsum(0).double()  # 1-based rank of the last member of each tie group
    average_rank = last - (counts.double() - 1) / 2
    rank_sum = average_rank[group][wrong[order]].sum().item()
    return (rank_sum - n_wrong * (n_wrong + 1) / 2) / (n_wrong * n_right)


def uncertainty_metrics(
    probs: Tensor,
    target: Tensor,
    uncertainties: Mapping[str, Tensor],
    class_dim: int = 1,
    n_bins: int = 15,
) -> dict[str, float]:
    """Accuracy, calibration and error detection of one set of predictions.

    A prediction is wrong where ``argmax_c p_c != y`` (for ``C == 1``: ``(p > 0.5) != y``).

    Parameters
    ----------
    probs
        Class probabilities ``(N, C, *)``, ``C == 1`` binary (see
        :func:`negative_log_likelihood`).
    target
        Integer labels ``(N, *)``.
    uncertainties
        Uncertainty maps by name, each of ``target``'s shape (e.g. ``{"mi": mutual
        information, "entropy": predictive entropy}``).
    class_dim
        Dimension of the classes in ``probs``.
    n_bins
        Bins of the ECE.

    Returns
    -------
    dict
        ``accuracy``, ``nll`` (:func:`negative_log_likelihood`), ``brier``
        (:func:`brier_score`), ``ece`` (:func:`expected_calibration_error`) and
        ``auroc_<name>`` (:func:`error_detection_auroc`, ``nan`` when all or none are
        wrong) for each map, as floats.

    Raises
    ------
    ValueError
        ``probs`` and ``target`` whose shapes do not match, an uncertainty map (named)
        of another shape than ``target``, labels outside the classes, no predictions.
    """
    p, y = _labelled_rows(probs, target, class_dim)
    for name, u in uncertainties.items():
        if u.shape != target.shape:
            raise ValueError(
                f"uncertainties[{name!r}] has shape {tuple(u.shape)}, target "
                f"{tuple(target.shape)}: one score per prediction"
            )
    wrong = p.argmax(1) != y
    scores = {
        "accuracy": 1.0 - wrong.double().mean().item(),
        "nll": _nll(p, y).mean().item(),
        "brier": _brier(p, y).mean().item(),
        "ece": _ece(p, y, n_bins).item(),
    }
    for name, u in uncertainties.items():
        scores[f"auroc_{name}"] = error_detection_auroc(u.reshape(-1), wrong)
    return scores

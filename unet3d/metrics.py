"""Test-set metrics of the ``unet3d`` application: per-volume Dice, IoU and HD95.

As in Kuzina et al. (2019), every test volume is scored on its own and the scores are
averaged over the test set (mean and population standard deviation, ``ddof=0``).  The
scores are MONAI's, on the foreground class only (``include_background=False``):

* **Dice** ``2 |A n B| / (|A| + |B|)`` -- :class:`monai.metrics.DiceMetric`;
* **IoU** ``|A n B| / |A u B|`` -- :class:`monai.metrics.MeanIoU`;
* **HD95** -- :class:`monai.metrics.HausdorffDistanceMetric` with ``percentile=95``: the
  larger of the two directed 95th-percentile surface distances, **in mm** when a voxel
  ``spacing`` (or the image affine) is given, in voxels otherwise.

:func:`voxel_uncertainty` scores the probabilities and uncertainty maps of one prediction
per voxel (NLL, Brier, ECE, error-detection AUROC; :func:`dwp.uncertainty_metrics`), over
the whole volume and inside :func:`uncertainty_region`.

Empty masks (``A`` = prediction, ``B`` = label)
-----------------------------------------------
What MONAI 1.6 returns, and what is reported here:

* **both empty**: MONAI's Dice / IoU are ``nan`` (default ``ignore_empty=True``) or ``1.0``
  (``ignore_empty=False``), its HD95 ``nan`` with a warning.  Reported: Dice 1.0, IoU 1.0,
  HD95 ``nan`` (excluded).
* **label empty, prediction not**: Dice / IoU ``nan`` (``ignore_empty=True``) or ``0.0``,
  HD95 ``nan``.  Reported: 0.0, 0.0, ``nan`` (excluded).
* **prediction empty, label not**: Dice / IoU ``0.0``, HD95 ``nan`` with a warning (its
  warning says "nan/inf").  Reported: 0.0, 0.0, ``nan`` (excluded).

So Dice and IoU are always defined (a correct "nothing here" is perfect, a miss or a false
alarm is a total failure) and enter the means; HD95 is undefined when either mask is empty
(a distance to nothing): it stays ``nan`` in the per-volume list, is left out of
``hd95_mean`` / ``hd95_std``, and ``hd95_n_excluded`` says how many volumes were left out.
(Some challenges substitute 0 for both-empty and a large distance, such as the image
diagonal, for one-empty; apply such a rule to the per-volume list if you need it.)  The empty cases
are decided here from voxel counts before MONAI is called, so no MONAI warning is raised.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

import dwp
from dwp.extras import from_extra

with from_extra("unet3d", needed_by="unet3d.metrics"):  # MONAI is not in the core install
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

if TYPE_CHECKING:
    from .inference import VolumePrediction

__all__ = [
    "ROI_MARGIN",
    "SegmentationScores",
    "evaluate",
    "score_volume",
    "score_volumes",
    "uncertainty_region",
    "voxel_spacing",
    "voxel_uncertainty",
]


def voxel_spacing(affine: Any) -> tuple[float, float, float]:
    """Voxel sizes (mm) from a 4x4 (or 3x3) affine: the norms of its first three columns.

    The same as nibabel's ``header.get_zooms()[:3]`` for a consistent image; the order
    follows the array axes, which is what MONAI's ``spacing`` expects.
    """
    a = np.asarray(affine.detach().cpu() if isinstance(affine, Tensor) else affine, dtype=float)
    if a.shape not in ((4, 4), (3, 3)):
        raise ValueError(f"an affine must be 4x4 (or 3x3), got shape {a.shape}")
    zooms = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise ValueError(f"affine gives invalid voxel sizes {zooms.tolist()}")
    return tuple(float(z) for z in zooms)  # type: ignore[return-value]


def _spacing3(spacing: Any) -> tuple[float, float, float]:
    s = np.asarray(spacing.detach().cpu() if isinstance(spacing, Tensor) else spacing, dtype=float)
    if s.shape == (4, 4):
        return voxel_spacing(s)
    if s.shape != (3,):
        raise ValueError(f"spacing must be 3 voxel sizes or a 4x4 affine, got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"voxel sizes must be finite and > 0, got {s.tolist()}")
    return tuple(float(v) for v in s)  # type: ignore[return-value]


def _spacings(spacing: Any, n: int) -> list[tuple[float, float, float] | None]:
    """One spacing per volume from None, ``(3,)`` / ``(4, 4)`` (shared) or ``(n, 3)`` / ``(n, 4, 4)``."""
    if spacing is None:
        return [None] * n
    s = np.asarray(spacing.detach().cpu() if isinstance(spacing, Tensor) else spacing, dtype=float)
    if s.shape in ((3,), (4, 4)):
        return [_spacing3(s)] * n
    if s.shape in ((n, 3), (n, 4, 4)):
        return [_spacing3(row) for row in s]
    raise ValueError(
        f"spacing must be 3 voxel sizes or a 4x4 affine (shared), or ({n}, 3) / ({n}, 4, 4) "
        f"(one per volume), got shape {s.shape}"
    )


def _label_map(x: Any, what: str) -> Tensor:
    """A 3D CPU tensor from a ``(D, H, W)`` or ``(1, D, H, W)`` tensor or array."""
    t = torch.as_tensor(x.detach().cpu() if isinstance(x, Tensor) else np.asarray(x))
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3:
        raise ValueError(
            f"{what} must be a 3D label map (D, H, W) or (1, D, H, W), got shape {tuple(t.shape)}"
        )
    return t


def _mask(x: Any, what: str) -> Tensor:
    """A binary 3D mask (bool tensor) from ``(D, H, W)`` or ``(1, D, H, W)`` labels."""
    t = _label_map(x, what)
    if t.dtype != torch.bool:
        values = torch.unique(t)
        bad = values[(values != 0) & (values != 1)]
        if bad.numel():
            shown = ", ".join(f"{v:g}" for v in bad[:10].tolist())
            raise ValueError(
                f"{what} must be binary (0 = background, 1 = foreground; take the argmax of "
                f"probabilities first), got values {shown}"
            )
        t = t != 0
    return t


def _volumes(x: Any, what: str) -> list[Tensor]:
    if isinstance(x, (Tensor, np.ndarray)):
        if x.ndim == 3:
            raise ValueError(
                f"{what}: got one 3D volume of shape {tuple(x.shape)}; pass a list of volumes "
                f"or a stacked (N, D, H, W) array"
            )
        if x.ndim not in (4, 5):
            raise ValueError(
                f"{what} must be (N, D, H, W), (N, 1, D, H, W) or a sequence of volumes, got "
                f"shape {tuple(x.shape)}"
            )
        items = list(x)
    else:
        items = list(x)
    return [_mask(v, f"{what}[{i}]") for i, v in enumerate(items)]


def _one_hot(mask: Tensor) -> Tensor:
    m = mask.float()
    return torch.stack([1 - m, m]).unsqueeze(0)  # (1, 2, D, H, W)


def score_volume(prediction: Any, label: Any, spacing: Any = None) -> dict[str, float]:
    """Dice, IoU and HD95 of one binary volume pair (see the module docstring for empty masks).

    ``spacing``: 3 voxel sizes (mm) or a 4x4 affine; None gives HD95 in voxels.
    """
    pred, lab = _mask(prediction, "prediction"), _mask(label, "label")
    if pred.shape != lab.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} does not match label {tuple(lab.shape)}"
        )
    sp = None if spacing is None else _spacing3(spacing)
    return _score(pred, lab, sp)


def _score(pred: Tensor, lab: Tensor, spacing: tuple[float, float, float] | None) -> dict:
    n_pred, n_lab = int(pred.sum()), int(lab.sum())
    if n_pred == 0 and n_lab == 0:
        return {"dice": 1.0, "iou": 1.0, "hd95": math.nan}
    if n_pred == 0 or n_lab == 0:
        return {"dice": 0.0, "iou": 0.0, "hd95": math.nan}
    p, y = _one_hot(pred), _one_hot(lab)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(p, y)
    iou = MeanIoU(include_background=False, reduction="none", ignore_empty=False)(p, y)
    hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    with warnings.catch_warnings():
        # MONAI 1.6 deprecates an argument that its own HD code still passes.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        hd95 = hd(p, y, spacing=None if spacing is None else list(spacing))
    return {"dice": float(dice.item()), "iou": float(iou.item()), "hd95": float(hd95.item())}


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std())


@dataclass(frozen=True)
class SegmentationScores:
    """Per-volume scores of a test set and their summaries.

    ``hd95`` keeps ``nan`` for volumes where it is undefined (an empty mask); the HD95
    summaries are over the other ``hd95_n_valid`` volumes.  Standard deviations are over
    volumes with ``ddof=0``.
    """

    dice: list[float]
    iou: list[float]
    hd95: list[float]
    hd95_unit: str = "mm"
    n_empty_label: int = 0
    n_empty_prediction: int = 0
    n_both_empty: int = 0
    dice_mean: float = field(init=False)
    dice_std: float = field(init=False)
    iou_mean: float = field(init=False)
    iou_std: float = field(init=False)
    hd95_mean: float = field(init=False)
    hd95_std: float = field(init=False)
    hd95_n_valid: int = field(init=False)
    hd95_n_excluded: int = field(init=False)
    n_volumes: int = field(init=False)

    def __post_init__(self) -> None:
        if not (len(self.dice) == len(self.iou) == len(self.hd95)):
            raise ValueError("dice, iou and hd95 need one value per volume each")
        valid = [h for h in self.hd95 if math.isfinite(h)]
        put = object.__setattr__
        put(self, "n_volumes", len(self.dice))
        put(self, "dice_mean", _mean_std(self.dice)[0])
        put(self, "dice_std", _mean_std(self.dice)[1])
        put(self, "iou_mean", _mean_std(self.iou)[0])
        put(self, "iou_std", _mean_std(self.iou)[1])
        put(self, "hd95_mean", _mean_std(valid)[0])
        put(self, "hd95_std", _mean_std(valid)[1])
        put(self, "hd95_n_valid", len(valid))
        put(self, "hd95_n_excluded", len(self.hd95) - len(valid))

    def as_dict(self) -> dict[str, Any]:
        """Plain Python values (JSON-ready except for ``nan``)."""
        return asdict(self)

    def summary(self) -> str:
        """One line, e.g. ``Dice 0.712 +- 0.081, IoU ..., HD95 4.1 +- 1.2 mm (n = 20)``."""
        excl = f", {self.hd95_n_excluded} excluded" if self.hd95_n_excluded else ""
        return (
            f"Dice {self.dice_mean:.3f} +- {self.dice_std:.3f}, "
            f"IoU {self.iou_mean:.3f} +- {self.iou_std:.3f}, "
            f"HD95 {self.hd95_mean:.2f} +- {self.hd95_std:.2f} {self.hd95_unit}{excl} "
            f"(n = {self.n_volumes})"
        )


def score_volumes(predictions: Any, labels: Any, spacing: Any = None) -> SegmentationScores:
    """Score every (prediction, label) pair of a test set; see :func:`evaluate`."""
    preds, labs = _volumes(predictions, "predictions"), _volumes(labels, "labels")
    if len(preds) != len(labs):
        raise ValueError(f"got {len(preds)} predictions for {len(labs)} labels")
    if not preds:
        raise ValueError("no volumes to score")
    spacings = _spacings(spacing, len(preds))
    rows = []
    for i, (p, y, sp) in enumerate(zip(preds, labs, spacings, strict=True)):
        if p.shape != y.shape:
            raise ValueError(
                f"volume {i}: prediction shape {tuple(p.shape)} does not match label "
                f"{tuple(y.shape)}"
            )
        rows.append(_score(p, y, sp))
    empty_p = [not bool(p.any()) for p in preds]
    empty_y = [not bool(y.any()) for y in labs]
    return SegmentationScores(
        dice=[r["dice"] for r in rows],
        iou=[r["iou"] for r in rows],
        hd95=[r["hd95"] for r in rows],
        hd95_unit="voxel" if spacing is None else "mm",
        n_empty_label=sum(empty_y),
        n_empty_prediction=sum(empty_p),
        n_both_empty=sum(a and b for a, b in zip(empty_p, empty_y, strict=True)),
    )


def evaluate(predictions: Any, labels: Any, spacing: Any = None) -> dict[str, Any]:
    """Per-volume foreground Dice, IoU and HD95 of a test set, with means and stds.

    Parameters
    ----------
    predictions, labels
        Binary label maps (0 / 1 or bool; take the argmax of the network's output first):
        a sequence of ``(D, H, W)`` or ``(1, D, H, W)`` volumes (sizes may differ between
        pairs) or a stacked ``(N, D, H, W)`` / ``(N, 1, D, H, W)`` tensor or array.
    spacing
        Voxel sizes in mm for HD95, in array-axis order: three numbers or a 4x4 affine
        shared by all volumes, or one such per volume (``(N, 3)`` / ``(N, 4, 4)`` or a
        list).  None reports HD95 in voxels (``hd95_unit == "voxel"``).

    Returns
    -------
    dict
        :meth:`SegmentationScores.as_dict`: the per-volume lists ``dice``, ``iou``,
        ``hd95``; ``dice_mean``, ``dice_std``, ``iou_mean``, ``iou_std``, ``hd95_mean``,
        ``hd95_std`` (over the ``hd95_n_valid`` volumes where HD95 is defined),
        ``hd95_n_excluded``, ``hd95_unit``, ``n_volumes``, and the counts of empty labels,
        empty predictions and both empty.
    """
    return score_volumes(predictions, labels, spacing).as_dict()


#: Voxels around the label and predicted foreground that :func:`uncertainty_region` adds:
#: 12 mm at the transfer benchmark's 4 mm.  A boundary's probabilities are expected to
#: fall from ~1 to ~0 within a voxel or two; three leave room (a choice, not tuned).
ROI_MARGIN = 3


def _dilate(mask: Tensor, margin: int) -> Tensor:
    """``mask`` grown by ``margin`` voxels along every axis (a ``(2m+1)^3`` cube, i.e.
    Chebyshev distance <= m): three 1D max-pools, ``O(m)`` per voxel."""
    if margin == 0:
        return mask
    grown = mask[None, None].float()
    for axis in range(3):
        kernel = [1, 1, 1]
        kernel[axis] = 2 * margin + 1
        padding = [k // 2 for k in kernel]
        grown = torch.nn.functional.max_pool3d(grown, kernel, stride=1, padding=padding)
    return grown[0, 0] > 0


def uncertainty_region(prediction_mask: Tensor, label: Tensor, margin: int = ROI_MARGIN) -> Tensor:
    """The voxels within ``margin`` voxels of the label's or the prediction's foreground.

    A brain volume is mostly easy background, predicted right with confidence ~1 by
    every method; over a whole volume those voxels drown the ones that matter, making the
    voxel ECE, NLL and Brier tiny and alike for every method.  This region keeps
    what matters and drops the rest:

    * it holds **every wrong voxel** (an error is foreground in the label or in the
      prediction), so its NLL and Brier still charge every error, and its AUROC ranks the
      same errors against the right voxels next to them rather than against the far
      background, which any uncertainty map ranks low;
    * the ``margin`` adds the shell of right voxels around the boundaries, where a
      calibrated model should be unsure (partial volume, blurred edges);
    * a dilated mask rather than a dilated bounding box: a stray false positive far from
      the lesion adds its own neighbourhood, not the whole box between the two, so the
      region grows with what a method predicts, not with how far apart it predicts it.

    The region depends on the prediction, so two methods are scored on slightly different
    voxels of a volume (:func:`voxel_uncertainty` reports its size); right but uncertain
    voxels far from any foreground fall outside it (they count in the whole-volume
    scores).  Empty when neither label nor prediction has foreground.

    Parameters
    ----------
    prediction_mask, label
        ``(D, H, W)`` class maps; foreground is any class but 0.
    margin
        Voxels added around the foreground along each axis (a cube: the Chebyshev
        distance), >= 0.

    Returns
    -------
    Tensor
        ``(D, H, W)`` bool.
    """
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ValueError(f"margin must be an int >= 0, got {margin!r}")
    if prediction_mask.shape != label.shape or label.dim() != 3:
        raise ValueError(
            f"prediction mask {tuple(prediction_mask.shape)} and label {tuple(label.shape)} "
            "must be the same (D, H, W)"
        )
    return _dilate((prediction_mask != 0) | (label != 0), margin)


def voxel_uncertainty(
    prediction: VolumePrediction,
    label: Any,
    region: Any = None,
    *,
    margin: int = ROI_MARGIN,
    n_bins: int = 15,
) -> dict[str, float]:
    """Per-voxel quality of one volume's probabilities and uncertainty maps.

    :func:`dwp.uncertainty_metrics` over the voxels, with the prediction's two uncertainty
    maps: ``mi`` (mutual information, the epistemic part) and ``entropy`` (predictive
    entropy, the total).  A voxel is wrong where the most probable class is not the label.
    The deterministic network's baseline, its softmax entropy, is the ``entropy`` of a
    one-pass prediction (:func:`unet3d.inference.predict_volume` of a deterministic model,
    or ``sample=False``); its ``mi`` is 0 everywhere, so ``auroc_mi`` is 0.5 (all ties).
    Test-time augmentation (:func:`unet3d.inference.predict_volume_tta`) is scored the
    same way, its ``mi`` the disagreement between the flips.

    Each metric is reported twice: ``<metric>_all`` over every scored voxel, and
    ``<metric>_roi`` inside :func:`uncertainty_region` (the voxels near the label's or the
    prediction's foreground; see there why): over a whole brain volume the easy background
    makes the voxel ECE tiny for every method.

    Parameters
    ----------
    prediction
        A :class:`unet3d.inference.VolumePrediction` (probabilities ``(K, D, H, W)``).
    label
        ``(D, H, W)`` (or ``(1, D, H, W)``) integer labels in ``[0, K)``.
    region
        Optional ``(D, H, W)`` bool mask: score only these voxels (e.g. a brain mask); the
        uncertainty region is intersected with it.
    margin
        Of :func:`uncertainty_region`.
    n_bins
        Bins of the ECE.

    Returns
    -------
    dict
        ``accuracy``, ``nll``, ``brier``, ``ece``, ``auroc_mi``, ``auroc_entropy``, each
        with the suffix ``_all`` and ``_roi`` (all ``nan`` when the region is empty: no
        foreground anywhere), and ``roi_fraction``: the share of the scored voxels in the
        region.

    Raises
    ------
    ValueError
        A label or region that is not the prediction's ``(D, H, W)``, labels outside the
        classes, a region that selects no voxel.
    """
    probs = prediction.probabilities
    spatial = tuple(probs.shape[1:])
    target = _on_grid(label, "label", spatial).long()
    scored = (
        torch.ones(spatial, dtype=torch.bool)
        if region is None
        else _on_grid(region, "region", spatial).bool()
    )
    if not scored.any():
        raise ValueError("region selects no voxel")
    roi = uncertainty_region(prediction.mask.cpu(), target, margin) & scored
    maps = {"mi": prediction.mutual_information, "entropy": prediction.predictive_entropy}

    def score(where: Tensor) -> dict[str, float]:
        uncertainties = {name: m[where] for name, m in maps.items()}
        return dwp.uncertainty_metrics(
            probs[:, where], target[where], uncertainties, class_dim=0, n_bins=n_bins
        )

    everywhere = score(scored)
    inside = score(roi) if roi.any() else dict.fromkeys(everywhere, math.nan)
    scores = {f"{k}_all": v for k, v in everywhere.items()}
    scores.update({f"{k}_roi": v for k, v in inside.items()})
    scores["roi_fraction"] = float(roi.sum()) / float(scored.sum())
    return scores


def _on_grid(x: Any, what: str, shape: tuple[int, ...]) -> Tensor:
    """:func:`_label_map`, checked to be the prediction's ``(D, H, W)`` grid."""
    t = _label_map(x, what)
    if tuple(t.shape) != shape:
        raise ValueError(
            f"{what} has shape {tuple(t.shape)}; the prediction's (D, H, W) is {shape}"
        )
    return t

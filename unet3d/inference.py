"""Sliding-window inference for :class:`unet3d.UNet3D` (and any segmentation network).

* :func:`predict_volume`: one ``(C, D, H, W)`` volume of any size -> class probabilities,
  the mask (argmax) and, for Bayesian networks, the epistemic uncertainty (mutual
  information) averaged over ``n_samples`` posterior samples.
* :func:`predict_case`: a :class:`unet3d.data.Case` -> ``<id>_prob.nii.gz`` (foreground
  probability, float32), ``<id>_mask.nii.gz`` (uint8) and ``<id>_mi.nii.gz`` (float32) on
  the input file's grid, with its affine and header.

A trained network is rebuilt from its checkpoint by :func:`unet3d.checkpoint.load_model`.

Windows are blended with MONAI's :func:`monai.inferers.sliding_window_inference`
(Gaussian-weighted overlap).  MONAI is imported when a prediction is made.

Posterior samples
-----------------
A Bayesian network (one with a :class:`dwp.BayesianLayer` inside) is run ``n_samples``
times over the whole volume, **with one weight sample per pass** (:func:`dwp.fixed_sample`):
before a pass every Bayesian layer's weight (and Bayesian bias) is replaced by a draw
``mu + sigma * eps`` from its posterior, every window of that pass is computed with the
same weights, and the posterior means are put back afterwards (also on errors).
Each pass is therefore one coherent network, and the windows blended in a pass agree with
each other; drawing new weights per window (what ``dwp.sampling()`` with the ``reparam``
estimator would do) would mix networks inside one prediction, and the ``local_reparam`` /
``flipout`` estimators do not even draw a weight sample.  The layers' estimator setting is
thus irrelevant here.  Because the weights are swapped in place, do not use the model from
another thread during a call.

Statistics are streamed (:class:`dwp.PredictiveStatistics`): the running sums of the
probabilities and of the per-sample entropies are the only volumes kept, so memory does not
grow with ``n_samples``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import torch
from torch import Tensor, nn

import dwp
from nifti_io import save_nifti

from .data import Case, Normalise, SegmentationDataset, uncrop
from .model import SIZE_DIVISOR

__all__ = [
    "MIN_ROI",
    "VolumePrediction",
    "predict_case",
    "predict_volume",
]

#: Smallest window side: three stride-2 levels leave 2 voxels, the least InstanceNorm takes.
MIN_ROI = 2 * SIZE_DIVISOR


@dataclass(frozen=True)
class VolumePrediction:
    """The prediction for one volume, on the input's spatial grid ``(D, H, W)``.

    Attributes
    ----------
    probabilities
        ``(K, D, H, W)`` float32: the predictive class probabilities ``E_q[p(y | x, w)]``
        (sum to 1 over K).
    mask
        ``(D, H, W)`` int64: the most probable class of each voxel.
    mutual_information
        ``(D, H, W)`` float32: ``H[E_q p] - E_q H[p]`` in nats, clamped at 0 (the epistemic
        part of the uncertainty); all zeros for a deterministic model.
    predictive_entropy
        ``(D, H, W)`` float32: ``H[E_q p]``, the total uncertainty in nats.
    n_samples
        Passes averaged (1 for a deterministic model).
    """

    probabilities: Tensor
    mask: Tensor
    mutual_information: Tensor
    predictive_entropy: Tensor
    n_samples: int

    @property
    def foreground(self) -> Tensor:
        """``(D, H, W)``: probability of any class but 0 (the background)."""
        return (1.0 - self.probabilities[0]).clamp_(0.0, 1.0)


def _roi(roi_size: int | Sequence[int]) -> tuple[int, int, int]:
    roi = (roi_size,) * 3 if isinstance(roi_size, int) else tuple(roi_size)
    if len(roi) != 3 or any(
        isinstance(r, bool) or not isinstance(r, int) or r < MIN_ROI or r % SIZE_DIVISOR
        for r in roi
    ):
        raise ValueError(
            f"roi_size must be an int or 3 ints, each a multiple of {SIZE_DIVISOR} and at "
            f"least {MIN_ROI} (the U-Net's three stride-2 levels), got {roi_size!r}"
        )
    return roi  # type: ignore[return-value]


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def predict_volume(
    model: nn.Module,
    image: Tensor,
    n_samples: int = 8,
    *,
    roi_size: int | Sequence[int] = 64,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    n_classes: int | None = None,
    seed: int | None = None,
    sample: bool = True,
) -> VolumePrediction:
    """Predict one volume of any size with Gaussian-weighted sliding windows.

    Parameters
    ----------
    model
        Segmentation network ``(B, C, *roi) -> (B, K, *roi)`` logits, ``K >= 2`` (softmax
        over K), e.g. :class:`unet3d.UNet3D`.  Run in ``eval()``; its train / eval state is
        restored afterwards (and a Bayesian model's posterior means, see the module notes).
    image
        ``(C, D, H, W)``, normalised as in training (e.g. a :class:`SegmentationDataset`
        item's ``"image"``).  Any spatial size: windows smaller than ``roi_size`` are used
        along short axes (the axis rounded up to a multiple of 8, at least 16) and MONAI pads
        the volume to the window with zeros; the maps come back at ``(D, H, W)``.
    n_samples
        Posterior samples (full sliding-window passes, one weight sample each) for a
        Bayesian model; a deterministic model makes one pass whatever this is.
    roi_size
        Window size, an int or 3 ints, each a multiple of 8 and at least 16.
    overlap
        Fraction of a window shared with its neighbour, in ``[0, 1)``.
    sw_batch_size
        Windows per forward pass.
    n_classes
        When given, the model must output this many channels.
    seed
        Seed of the weight samples (a private generator: the global RNG is left alone);
        ``None`` draws from torch's global RNG.
    sample
        ``False`` makes one pass with a Bayesian model's posterior means (mutual
        information 0), as ``dwp.predict(..., sample=False)``.

    Returns
    -------
    VolumePrediction
        On CPU.

    Raises
    ------
    ValueError
        ``n_samples < 1``, a bad ``roi_size`` / ``overlap`` / ``sw_batch_size``, an image
        that is not ``(C, D, H, W)`` or has the wrong number of channels, a model output
        with fewer than 2 channels, ``n_classes`` channels expected but others found, or a
        window output of the wrong spatial size.
    """
    from monai.inferers import sliding_window_inference

    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
    roi = _roi(roi_size)
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be an int >= 1, got {sw_batch_size!r}")
    if not isinstance(image, Tensor) or image.dim() != 4:
        shape = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
        raise ValueError(f"image must be a (C, D, H, W) tensor, got {shape}")
    if not image.is_floating_point():
        image = image.float()
    expected_in = getattr(model, "in_channels", None)
    if isinstance(expected_in, int) and image.shape[0] != expected_in:
        raise ValueError(
            f"image has {image.shape[0]} channels, the model takes {expected_in} "
            "(choose the modality with modality=...)"
        )
    spatial = tuple(image.shape[1:])
    # No window larger than the (8-rounded) volume: less padding, fewer wasted voxels.
    window = tuple(
        min(r, max(MIN_ROI, -(-n // SIZE_DIVISOR) * SIZE_DIVISOR))
        for r, n in zip(roi, spatial, strict=True)
    )

    def predictor(x: Tensor) -> Tensor:
        logits = model(x)
        if logits.dim() != 5 or tuple(logits.shape[2:]) != tuple(x.shape[2:]):
            raise ValueError(
                f"the model maps a window {tuple(x.shape)} to {tuple(logits.shape)}; it must "
                "keep the spatial size (B, K, D, H, W)"
            )
        channels = logits.shape[1]
        if n_classes is not None and channels != n_classes:
            raise ValueError(
                f"the model outputs {channels} channels, but {n_classes} classes are expected"
            )
        if channels < 2:
            raise ValueError(
                f"the model outputs {channels} channel; softmax segmentation needs >= 2 "
                "(background and foreground logits)"
            )
        return logits.float().softmax(1)

    bayesian = sample and bool(dwp.bayesian_layers(model))
    passes = n_samples if bayesian else 1
    device = _device(model)
    x = image.to(device)[None]
    generator = None
    if bayesian and seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))

    def one_pass() -> Tensor:
        out = sliding_window_inference(
            x, window, sw_batch_size, predictor, overlap=overlap, mode="gaussian"
        )
        # plain tensor (MONAI may return a MetaTensor), double for the running sums
        return out.as_subclass(Tensor)[0].double()

    # no variance: one volume less in memory; the entropies give the mutual information
    stats = dwp.PredictiveStatistics("classification", class_dim=0, variance=False)
    was_training = model.training
    try:
        model.eval()
        for _ in range(passes):
            if bayesian:
                with dwp.fixed_sample(model, generator):
                    probs = one_pass()
            else:  # a Bayesian model's layers use their posterior means in eval()
                with dwp.sampling(False, model):
                    probs = one_pass()
            # Gaussian blending may leave sums a rounding error away from 1
            stats.update(probs / probs.sum(0, keepdim=True))
    finally:
        model.train(was_training)

    result = stats.result(torch.float32)
    return VolumePrediction(
        probabilities=result.mean.cpu(),
        mask=stats.mean.argmax(0).cpu(),  # of the float64 mean, as the sums were kept
        mutual_information=result.mutual_information.cpu(),
        predictive_entropy=result.predictive_entropy.cpu(),
        n_samples=passes,
    )


def predict_case(
    model: nn.Module,
    case: Case,
    out_dir: str | os.PathLike[str],
    n_samples: int = 8,
    *,
    normalise: Normalise | None = "minmax",
    modality: int | None = None,
    roi_size: int | Sequence[int] = 64,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    n_classes: int | None = None,
    seed: int | None = None,
) -> dict[str, Path]:
    """Predict one case and write its maps as NIfTI on the input image's grid.

    The image is loaded by :class:`unet3d.data.SegmentationDataset` (give the
    ``normalise`` and ``modality`` used in training), predicted with
    :func:`predict_volume`, mapped back to the file's shape with
    :func:`unet3d.data.uncrop` (voxels outside the network's grid get 0) and written
    atomically with :func:`nifti_io.save_nifti`, with the input's affine and header:

    * ``<id>_prob.nii.gz``: foreground probability ``1 - p(class 0)``, float32;
    * ``<id>_mask.nii.gz``: the most probable class, uint8;
    * ``<id>_mi.nii.gz``: mutual information (nats), float32, zeros for a deterministic
      model.

    Parameters
    ----------
    model, n_samples, roi_size, overlap, sw_batch_size, n_classes, seed
        As in :func:`predict_volume`.
    case
        The case (its label, if any, is checked but not used).
    out_dir
        Folder for the three files (created if needed).
    normalise, modality
        As in :class:`SegmentationDataset`.

    Returns
    -------
    dict
        ``{"prob": path, "mask": path, "mi": path}``.

    Raises
    ------
    unet3d.data.DataError
        An unreadable or malformed input (naming the file).
    ValueError
        As :func:`predict_volume`.
    """
    dataset = SegmentationDataset([case], normalise=normalise, modality=modality)
    item: dict[str, Any] = dataset[0]
    prediction = predict_volume(
        model,
        item["image"],
        n_samples,
        roi_size=roi_size,
        overlap=overlap,
        sw_batch_size=sw_batch_size,
        n_classes=n_classes,
        seed=seed,
    )
    if int(prediction.mask.max()) > 255:
        raise ValueError(f"{prediction.probabilities.shape[0]} classes do not fit in uint8")
    record = item["crop"]
    affine = item["affine"]
    header = nib.load(case.image).header
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    maps = {
        "prob": uncrop(prediction.foreground.numpy().astype("float32"), record),
        "mask": uncrop(prediction.mask.numpy().astype("uint8"), record),
        "mi": uncrop(prediction.mutual_information.numpy().astype("float32"), record),
    }
    return {
        key: save_nifti(array, out / f"{case.id}_{key}.nii.gz", affine, header)
        for key, array in maps.items()
    }

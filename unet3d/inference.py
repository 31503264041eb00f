"""Sliding-window inference for :class:`unet3d.UNet3D` (and any segmentation network).

* :func:`predict_volume`: one ``(C, D, H, W)`` volume of any size -> class probabilities,
  the mask (argmax) and, for Bayesian networks, the epistemic uncertainty (mutual
  information) averaged over ``n_samples`` posterior samples.
* :func:`predict_volume_tta`: the same with test-time augmentation (the softmax averaged
  over flipped copies of the volume), a baseline of uncertainty that needs no posterior.
* :func:`predict_case`: a :class:`unet3d.data.Case` -> ``<id>_prob.nii.gz`` (foreground
  probability, float32), ``<id>_mask.nii.gz`` (uint8) and ``<id>_mi.nii.gz`` (float32) on
  the input file's grid, with its affine and header, whatever spatial steps
  (:mod:`unet3d.spatial`: orientation, spacing, foreground crop) the network's input took.

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

Progress
--------
``progress=True`` shows tqdm bars on stderr (:mod:`tqdm.auto`: widgets in a notebook):
one over the passes (posterior samples, or the flips of :func:`predict_volume_tta`) with
their ETA when there are several, and MONAI's bar over the windows when there is a single
pass (a deterministic model, ``sample=False``, ``flips=()``).  ``window_progress=True``
adds the window bar to every pass, ``False`` leaves it out.  The bars draw no random numbers
and touch no tensor: the predictions are the same with and without them.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import dwp
from dwp.io import clean_stale_temporaries
from nifti_io import save_nifti

from .config import check_patch
from .data import Case, DataError, Normalise, SegmentationDataset, uncrop
from .model import SIZE_DIVISOR
from .spatial import Spatial, SpatialRecord

__all__ = [
    "MIN_ROI",
    "VolumePrediction",
    "flip_combinations",
    "predict_case",
    "predict_volume",
    "predict_volume_tta",
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
        part of the uncertainty); all zeros for one pass (a deterministic model, or the
        posterior means); across the flips for :func:`predict_volume_tta`.
    predictive_entropy
        ``(D, H, W)`` float32: ``H[E_q p]``, the total uncertainty in nats.
    n_samples
        Passes averaged: posterior samples (1 for a deterministic model), or the
        augmentations of :func:`predict_volume_tta`.
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
    roi = check_patch(roi_size, "roi_size")
    if roi is None:
        raise ValueError("roi_size must be an int or 3 ints, got None")
    return roi


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _sliding_window(
    model: nn.Module,
    image: Tensor,
    roi_size: int | Sequence[int],
    overlap: float,
    sw_batch_size: int,
    n_classes: int | None,
    progress: bool = False,
) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """Check the arguments of a whole-volume prediction; return ``one_pass`` and the image
    on the model's device.  ``one_pass(x)``: a ``(C, D, H, W)`` volume on that device ->
    its class probabilities ``(K, D, H, W)``, float64, Gaussian-blended windows (with
    MONAI's tqdm bar over the windows when ``progress``)."""
    from monai.inferers import sliding_window_inference

    roi = _roi(roi_size)
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    _positive_int(sw_batch_size, "sw_batch_size")
    if not isinstance(image, Tensor) or image.dim() != 4:
        shape = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
        raise ValueError(f"image must be a (C, D, H, W) tensor, got {shape}")
    if not image.is_floating_point():
        image = image.float()
    expected_in = getattr(model, "in_channels", None)
    if isinstance(expected_in, int) and image.shape[0] != expected_in:
        raise ValueError(
            f"image has {image.shape[0]} channels, the model takes {expected_in} "
            "(keep the channels it was trained on: SegmentationDataset(modality=K))"
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

    def one_pass(x: Tensor) -> Tensor:
        out = sliding_window_inference(
            x[None],
            window,
            sw_batch_size,
            predictor,
            overlap=overlap,
            mode="gaussian",
            progress=progress,
        )
        # plain tensor (MONAI may return a MetaTensor), double for the running sums
        probs = out.as_subclass(Tensor)[0].double()
        # Gaussian blending may leave sums a rounding error away from 1
        return probs / probs.sum(0, keepdim=True)

    return one_pass, image.to(_device(model))


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block; its train / eval state is restored after (also on
    errors)."""
    was_training = model.training
    try:
        model.eval()
        yield
    finally:
        model.train(was_training)


def _show_windows(progress: bool, window_progress: bool | None, passes: int) -> bool:
    """Whether the passes show MONAI's window bar: as asked, else with ``progress`` when
    there is one pass.  MONAI's bar cannot be told to clear itself, so over several passes
    it would leave one finished line per pass under the bar over the passes."""
    if window_progress is not None:
        return bool(window_progress)
    return progress and passes == 1


def _passes_bar(passes: int, progress: bool, desc: str, unit: str) -> tqdm:
    """The tqdm bar over ``passes`` full sliding-window passes (stderr, with their ETA);
    disabled without ``progress`` or for one pass, which the window bar shows better.

    ``leave=None`` keeps the finished bar when it is the outermost one and clears it when
    nested (under ``unet3d predict``'s bar over the files), so a run over many files does not
    leave one line per file.
    """
    return tqdm(
        total=passes,
        desc=desc,
        unit=unit,
        disable=not progress or passes < 2,
        leave=None,
        file=sys.stderr,
    )


def _statistics() -> dwp.PredictiveStatistics:
    # no variance: one volume less in memory; the entropies give the mutual information
    return dwp.PredictiveStatistics("classification", class_dim=0, variance=False)


def _volume_prediction(stats: dwp.PredictiveStatistics) -> VolumePrediction:
    result = stats.result(torch.float32)
    return VolumePrediction(
        probabilities=result.mean.cpu(),
        mask=stats.mean.argmax(0).cpu(),  # of the float64 mean, as the sums were kept
        mutual_information=result.mutual_information.cpu(),
        predictive_entropy=result.predictive_entropy.cpu(),
        n_samples=stats.n,
    )


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
    progress: bool = False,
    window_progress: bool | None = None,
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
    progress
        Show a tqdm bar (stderr) over the posterior samples, with their ETA, when there
        are several, else MONAI's bar over the windows of the one pass.  The prediction is
        the same either way.
    window_progress
        MONAI's bar over the windows: ``None`` (default) with ``progress`` and one pass,
        ``True`` in every pass (one finished line per sample), ``False`` never.

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
    _positive_int(n_samples, "n_samples")
    bayesian = sample and bool(dwp.bayesian_layers(model))
    passes = n_samples if bayesian else 1
    one_pass, x = _sliding_window(
        model,
        image,
        roi_size,
        overlap,
        sw_batch_size,
        n_classes,
        progress=_show_windows(progress, window_progress, passes),
    )
    generator = None
    if bayesian and seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(int(seed))
    stats = _statistics()
    # a context manager, not an iterator: the bar is closed (its line finished) on errors
    # and Ctrl-C too, before the CLI prints its message
    with _evaluating(model), _passes_bar(passes, progress, "samples", "sample") as bar:
        for _ in range(passes):
            if bayesian:
                with dwp.fixed_sample(model, generator):
                    stats.update(one_pass(x))
            else:  # a Bayesian model's layers use their posterior means in eval()
                with dwp.sampling(False, model):
                    stats.update(one_pass(x))
            bar.update()
    return _volume_prediction(stats)


def flip_combinations(flips: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes ``flips`` (0, 1, 2 = D, H, W), the empty one (no
    flip) first: the ``2 ** len(flips)`` augmentations of :func:`predict_volume_tta`."""
    axes = tuple(flips)
    if len(set(axes)) != len(axes) or any(
        isinstance(a, bool) or not isinstance(a, int) or a not in (0, 1, 2) for a in axes
    ):
        raise ValueError(
            f"flips must be distinct spatial axes among 0, 1, 2 (D, H, W), got {flips!r}"
        )
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


@torch.no_grad()
def predict_volume_tta(
    model: nn.Module,
    image: Tensor,
    flips: Sequence[int] = (0, 1, 2),
    *,
    roi_size: int | Sequence[int] = 64,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    n_classes: int | None = None,
    progress: bool = False,
    window_progress: bool | None = None,
) -> VolumePrediction:
    """Test-time augmentation: the softmax averaged over flipped copies of the volume.

    A baseline of uncertainty that needs no posterior.  Every combination of the spatial
    axes ``flips`` is one augmentation (``flips=(0, 1, 2)``: 8, the unflipped volume
    included): the volume is flipped (:class:`monai.transforms.Flip`), predicted as by
    :func:`predict_volume` (a Bayesian model with its posterior means), and its
    probabilities are flipped back onto the input's grid; the statistics are streamed
    over the augmentations as over posterior samples (:class:`dwp.PredictiveStatistics`).

    Parameters
    ----------
    model, image, roi_size, overlap, sw_batch_size, n_classes
        As in :func:`predict_volume`.
    progress, window_progress
        As in :func:`predict_volume`, the bar going over the augmentations.
    flips
        Spatial axes of the ``(C, D, H, W)`` image to flip: 0 = D, 1 = H, 2 = W.  ``()``
        gives :func:`predict_volume`'s one pass.

    Returns
    -------
    VolumePrediction
        On CPU: ``probabilities`` the mean over the augmentations, ``predictive_entropy``
        its entropy, ``mutual_information`` the disagreement between the augmentations
        (the entropy of the mean minus the mean entropy), ``n_samples`` the number of
        augmentations.

    Raises
    ------
    ValueError
        Bad ``flips``, and as :func:`predict_volume`.
    """
    from monai.transforms import Flip

    combinations = flip_combinations(flips)
    passes = len(combinations)
    one_pass, x = _sliding_window(
        model,
        image,
        roi_size,
        overlap,
        sw_batch_size,
        n_classes,
        progress=_show_windows(progress, window_progress, passes),
    )
    stats = _statistics()
    with (
        _evaluating(model),
        dwp.sampling(False, model),
        _passes_bar(passes, progress, "flips", "flip") as bar,
    ):
        for axes in combinations:
            if not axes:
                stats.update(one_pass(x))
            else:
                flip = Flip(spatial_axis=axes)  # its own inverse
                flipped = one_pass(flip(x).as_subclass(Tensor))
                stats.update(flip(flipped).as_subclass(Tensor))
            bar.update()
    return _volume_prediction(stats)


def _on_file_grid(
    prediction: VolumePrediction, record: SpatialRecord
) -> tuple[Tensor, Tensor, Tensor]:
    """Foreground probability, mask and mutual information of a prediction on the
    network's grid, resampled onto the file's grid (one resampling inverts every spatial
    step and the crop / pad).

    The class probabilities are resampled trilinearly, minus the background's one-hot
    vector: what lies outside the network's grid (cropped away) comes back as background,
    and the probabilities still sum to 1, interpolation being linear.  The mask is their
    argmax, so it agrees with them."""
    shifted = prediction.probabilities.double().clone()
    shifted[0] -= 1.0
    probabilities = torch.from_numpy(record.to_file_grid(shifted, "bilinear"))
    probabilities[0] += 1.0
    information = record.to_file_grid(prediction.mutual_information, "bilinear")
    return (
        (1.0 - probabilities[0]).clamp_(0.0, 1.0).float(),
        probabilities.argmax(0),
        torch.from_numpy(information).clamp_(min=0.0),
    )


def _check_channels(
    model: nn.Module, image: Tensor, path: Path, modality: int | Sequence[int] | None
) -> None:
    """A DataError naming the file when its channels are not the ones the model takes."""
    expected = getattr(model, "in_channels", None)
    channels = image.shape[0]
    if not isinstance(expected, int) or channels == expected:
        return
    if expected == 1 and modality is None:
        fix = "keep one of them with modality=K (unet3d predict --modality K)"
    else:
        fix = f"give images with the {expected} channel(s) it was trained on"
    raise DataError(f"{path}: {channels} channel(s), the model takes {expected}; {fix}")


def predict_case(
    model: nn.Module,
    case: Case,
    out_dir: str | os.PathLike[str],
    n_samples: int = 8,
    *,
    normalise: Normalise | None = "minmax",
    modality: int | Sequence[int] | None = None,
    spatial: Spatial | None = None,
    roi_size: int | Sequence[int] = 64,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    n_classes: int | None = None,
    seed: int | None = None,
    progress: bool = False,
    window_progress: bool | None = None,
) -> dict[str, Path]:
    """Predict one case and write its maps as NIfTI on the input image's grid.

    The image is loaded by :class:`unet3d.data.SegmentationDataset` (give the
    ``normalise``, ``modality`` and ``spatial`` steps used in training), predicted with
    :func:`predict_volume`, mapped back to the file's grid with :func:`unet3d.data.uncrop`
    (voxels outside the network's grid get 0), or, after spatial steps, resampled onto it
    (:meth:`unet3d.spatial.SpatialRecord.to_file_grid`: class probabilities trilinear,
    the mask their argmax, voxels cropped away background), and written atomically with
    :func:`nifti_io.save_nifti`, with the input's affine and header (every map is
    computed before the first is written):

    * ``<id>_prob.nii.gz``: foreground probability ``1 - p(class 0)``, float32;
    * ``<id>_mask.nii.gz``: the most probable class, uint8;
    * ``<id>_mi.nii.gz``: mutual information (nats), float32, zeros for a deterministic
      model.

    Parameters
    ----------
    model, n_samples, roi_size, overlap, sw_batch_size, n_classes, seed
        As in :func:`predict_volume`.
    progress, window_progress
        As in :func:`predict_volume`: the bar over the posterior samples (or the windows).
    case
        The case (its label, if any, is checked but not used).
    out_dir
        Folder for the three files (created if needed).
    normalise, modality, spatial
        As in :class:`SegmentationDataset`.

    Returns
    -------
    dict
        ``{"prob": path, "mask": path, "mi": path}``.

    Raises
    ------
    unet3d.data.DataError
        An unreadable or malformed input, or one with other channels than the model
        takes (naming the file).
    ValueError
        As :func:`predict_volume`.
    """
    dataset = SegmentationDataset([case], normalise=normalise, modality=modality, spatial=spatial)
    item: dict[str, Any] = dataset[0]
    _check_channels(model, item["image"], case.image, modality)
    prediction = predict_volume(
        model,
        item["image"],
        n_samples,
        roi_size=roi_size,
        overlap=overlap,
        sw_batch_size=sw_batch_size,
        n_classes=n_classes,
        seed=seed,
        progress=progress,
        window_progress=window_progress,
    )
    if int(prediction.mask.max()) > 255:
        raise ValueError(f"{prediction.probabilities.shape[0]} classes do not fit in uint8")
    if item["spatial"] is None:
        record = item["crop"]
        maps = {
            "prob": uncrop(prediction.foreground.numpy().astype("float32"), record),
            "mask": uncrop(prediction.mask.numpy().astype("uint8"), record),
            "mi": uncrop(prediction.mutual_information.numpy().astype("float32"), record),
        }
    else:
        foreground, mask, information = _on_file_grid(prediction, item["spatial"])
        maps = {
            "prob": foreground.numpy().astype("float32"),
            "mask": mask.numpy().astype("uint8"),
            "mi": information.numpy().astype("float32"),
        }
    affine = item["affine"]
    header = nib.load(case.image).header
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)  # an interrupted prediction's orphan writes
    return {
        key: save_nifti(array, out / f"{case.id}_{key}.nii.gz", affine, header)
        for key, array in maps.items()
    }

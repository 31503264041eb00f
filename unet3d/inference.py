"""Sliding-window inference for :class:`unet3d.UNet3D` (and any segmentation network).

* :func:`predict_volume`: one ``(C, D, H, W)`` volume of any size -> class probabilities,
  the mask (argmax) and, for Bayesian networks, the epistemic uncertainty (mutual
  information) averaged over ``n_samples`` posterior samples.
* :func:`predict_case`: a :class:`unet3d.data.Case` -> ``<id>_prob.nii.gz`` (foreground
  probability, float32), ``<id>_mask.nii.gz`` (uint8) and ``<id>_mi.nii.gz`` (float32) on
  the input file's grid, with its affine and header.
* :func:`load_model`: the network of a :func:`unet3d.train.train` checkpoint (``best.pt``,
  ``last.pt``), rebuilt from the training config stored in it, with its training config.

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

Statistics are streamed: the running sums of the probabilities and of the per-sample
entropies are the only volumes kept, so memory does not grow with ``n_samples``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import torch
from torch import Tensor, nn

import dwp
from dwp.nn import BayesianLayer
from dwp.predict import entropy
from dwp.settings import sampling

from .data import Case, Normalise, SegmentationDataset, save_nifti, uncrop
from .model import SIZE_DIVISOR, UNet3D

__all__ = [
    "MIN_ROI",
    "TrainedModel",
    "VolumePrediction",
    "load_model",
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


def _is_bayesian(model: nn.Module) -> bool:
    return any(isinstance(m, BayesianLayer) for m in model.modules())


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

    bayesian = sample and _is_bayesian(model)
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

    was_training = model.training
    sum_probs = sum_entropy = None
    try:
        model.eval()
        for _ in range(passes):
            if bayesian:
                with dwp.fixed_sample(model, generator):
                    probs = one_pass()
            else:  # a Bayesian model's layers use their posterior means in eval()
                with sampling(False, model):
                    probs = one_pass()
            # Gaussian blending may leave sums a rounding error away from 1
            probs = probs / probs.sum(0, keepdim=True)
            h = entropy(probs, class_dim=0)
            if sum_probs is None:
                sum_probs, sum_entropy = probs, h
            else:
                sum_probs += probs
                sum_entropy += h
    finally:
        model.train(was_training)

    mean = sum_probs / passes
    total = entropy(mean, class_dim=0)
    if bayesian:
        mutual_information = (total - sum_entropy / passes).clamp_min(0.0)
    else:
        mutual_information = torch.zeros_like(total)
    return VolumePrediction(
        probabilities=mean.float().cpu(),
        mask=mean.argmax(0).cpu(),
        mutual_information=mutual_information.float().cpu(),
        predictive_entropy=total.float().cpu(),
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
    atomically with :func:`unet3d.data.save_nifti`, with the input's affine and header:

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


# ---------------------------------------------------------------------------------------------
# Trained models


@dataclass(frozen=True)
class TrainedModel:
    """A network rebuilt from a training checkpoint, with what it was trained on.

    Attributes
    ----------
    model
        :class:`unet3d.UNet3D`, its 3x3x3 convs Bayesian for a variational strategy, in
        ``eval()`` mode, on CPU.
    config
        The run's :meth:`unet3d.train.TrainConfig.as_dict` (``normalise``, ``modality``,
        ``n_classes``, ``size``... are what prediction must reuse).
    strategy
        The strategy's :meth:`~unet3d.strategies.Strategy.describe` (at least ``name``).
    bayesian
        Whether ``model`` has Bayesian layers (posterior samples make sense).
    path
        The checkpoint read.
    epoch
        The (0-based) epoch the weights are from, when the checkpoint records it.
    """

    model: nn.Module
    config: dict[str, Any]
    strategy: dict[str, Any]
    bayesian: bool
    path: Path
    epoch: int | None


def _is_prior_key(key: str) -> bool:
    parts = key.split(".")
    return "weight_prior" in parts or "bias_prior" in parts


def _run_description(path: Path, payload: dict[str, Any]) -> tuple[dict, dict]:
    """The ``(config, strategy)`` JSON of a checkpoint, or of the ``last.pt`` beside it."""
    from .strategies import CheckpointError, read_checkpoint

    source, described = path, payload
    if "config" not in payload:
        # A best.pt of an earlier layout holds only the model, epoch and metrics; the run's
        # last.pt (same folder, same architecture) still describes it.
        sibling = path.parent / "last.pt"
        if sibling.resolve() == path.resolve() or not sibling.is_file():
            raise CheckpointError(
                f"{path}: no training config in the checkpoint (and no last.pt beside it) "
                "to rebuild the network from"
            )
        source, described = sibling, read_checkpoint(sibling)
        if not isinstance(described, dict) or "config" not in described:
            raise CheckpointError(f"{sibling}: no training config in this checkpoint either")
    try:
        config = json.loads(described["config"])
        strategy = json.loads(described.get("strategy") or "{}")
    except (TypeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{source}: malformed training config ({error})") from error
    if not isinstance(config, dict) or not isinstance(strategy, dict):
        raise CheckpointError(f"{source}: the training config is not a JSON object")
    return config, strategy


def load_model(checkpoint: str | os.PathLike) -> TrainedModel:
    """Rebuild the network of a :func:`unet3d.train.train` checkpoint for prediction.

    The U-Net's shape (``in_channels``, ``n_classes``, ``widths``) comes from the training
    config stored in the checkpoint (or, for a ``best.pt`` of an earlier layout, in the
    ``last.pt`` beside it); which layers are Bayesian from the weights themselves (those
    with a ``weight_log_sigma``), so checkpoints of custom strategies load too.

    The weight prior is *not* restored: prediction never evaluates it, so neither the prior
    file of a ``dwp`` run nor the source checkpoint of a ``pretrained`` one has to exist
    any more.  The Bayesian layers get a placeholder :class:`dwp.NormalPrior`, so the
    returned model's ``dwp.kl`` is meaningless; continue training with
    ``train(..., resume=True)`` instead.

    Parameters
    ----------
    checkpoint
        ``best.pt`` or ``last.pt`` of a training run.

    Returns
    -------
    TrainedModel

    Raises
    ------
    FileNotFoundError
        No such file.
    unet3d.strategies.CheckpointError
        An unreadable file, one that is not a training checkpoint, no stored training
        config, or weights that do not fit the network the config describes (naming the
        file).
    """
    # strategies imports the losses, hence MONAI: only when a model is loaded
    from .strategies import CheckpointError, read_checkpoint

    path = Path(checkpoint)
    payload = read_checkpoint(path)
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"{path}: not a unet3d training checkpoint (no 'model' entry)")
    config, strategy = _run_description(path, payload)
    state: dict[str, Tensor] = payload["model"]
    try:
        base = UNet3D(int(config["in_channels"]), int(config["n_classes"]), tuple(config["widths"]))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"{path}: the training config does not describe a UNet3D ({error!r})"
        ) from error
    suffix = ".weight_log_sigma"
    bayesian_layers = sorted(k[: -len(suffix)] for k in state if k.endswith(suffix))
    model: nn.Module = base
    if bayesian_layers:
        names = set(bayesian_layers)
        model = dwp.bayesianize(
            base,
            dwp.NormalPrior(),  # placeholder: see the docstring
            include=lambda name, layer: name in names,
            bayesian_bias=any(k.endswith(".bias_log_sigma") for k in state),
            inplace=True,
        )
        converted = {n for n, m in model.named_modules() if isinstance(m, BayesianLayer)}
        if converted != names:
            raise CheckpointError(
                f"{path}: Bayesian layers {sorted(names - converted)} are not convolutions "
                f"of UNet3D(widths={tuple(config['widths'])})"
            )
    weights = {k: v for k, v in state.items() if not _is_prior_key(k)}
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # shape mismatches
        reason = str(error).strip().splitlines()
        raise CheckpointError(
            f"{path}: the weights do not fit the UNet3D its config describes "
            f"({' '.join(r.strip() for r in reason[1:4])})"
        ) from error
    missing = [k for k in result.missing_keys if not _is_prior_key(k)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: the weights do not fit the UNet3D its config describes (missing "
            f"{missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    model.eval()
    epoch = payload.get("epoch")
    return TrainedModel(
        model=model,
        config=config,
        strategy=strategy,
        bayesian=bool(bayesian_layers),
        path=path,
        # last.pt records the number of epochs done, best.pt the epoch of its weights
        epoch=None if epoch is None else int(epoch) - (1 if "optimizer" in payload else 0),
    )

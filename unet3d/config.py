"""The options of a :func:`unet3d.train.train` run: :class:`TrainConfig`, and the
training-set :class:`Augmentation` it may ask for.

The defaults are the MRI paper's recipe (no augmentation).  A run's config is stored in
its checkpoints (:meth:`TrainConfig.as_dict`, as JSON), from which
:func:`unet3d.checkpoint.load_model` rebuilds the network and ``unet3d train --resume``
checks that a continued run is the same run (a setting missing from an older run's
config had its default, ``augmentation=None`` included).  Where a run computes and is
watched from (``device``, ``tensorboard``) is not part of it: :meth:`TrainConfig.as_dict`
leaves them out, so a run may resume on another device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from numbers import Real
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .spatial import Spatial

__all__ = ["Augmentation", "TrainConfig", "check_label_map", "check_modality", "check_patch"]


@dataclass(frozen=True)
class Augmentation:
    """Random augmentation of training volumes (MONAI transforms,
    :class:`unet3d.data.SegmentationDataset`); ``SegmentationDataset(augment=True)`` and
    ``TrainConfig(augmentation=True)`` use these defaults.

    Attributes
    ----------
    flip_prob : float
        Probability of flipping each spatial axis (image and label together), in [0, 1].
    rotate_prob : float
        Probability of a small rotation (image bilinear, label nearest neighbour), in
        [0, 1].
    max_rotation_deg : float
        Rotation angles are uniform in ``[-max, max]`` degrees about each axis (>= 0).
    intensity_prob : float
        Probability of each of the intensity scaling and shift (image only), in [0, 1].
    scale : float
        Intensities are multiplied by ``1 + u``, ``u`` uniform in ``[-scale, scale]``
        (>= 0).
    shift : float
        Then shifted by ``u`` uniform in ``[-shift, shift]`` (>= 0; images are in [0, 1]
        after min-max scaling).

    Raises
    ------
    ValueError
        A probability outside [0, 1], or a negative or non-finite range, naming the field.
    """

    flip_prob: float = 0.5
    rotate_prob: float = 0.2
    max_rotation_deg: float = 10.0
    intensity_prob: float = 0.5
    scale: float = 0.1
    shift: float = 0.1

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, Real):
                raise ValueError(f"Augmentation.{item.name} must be a number, got {value!r}")
            if item.name.endswith("_prob"):
                if not 0 <= value <= 1:
                    raise ValueError(f"Augmentation.{item.name} must be in [0, 1], got {value}")
            elif not (value >= 0 and math.isfinite(value)):
                raise ValueError(
                    f"Augmentation.{item.name} must be a finite number >= 0, got {value}"
                )


@dataclass
class TrainConfig:
    """Options of :func:`train` (the paper's recipe as defaults).

    Attributes
    ----------
    strategy : str
        A name of :data:`unet3d.strategies.STRATEGIES`.
    strategy_options : dict
        Keyword arguments of the strategy (``source=``, ``freeze_depth=``, ``beta=``,
        ``prior_path=``...).
    out_dir : str or Path, optional
        Where metrics and checkpoints go; ``None`` writes nothing (and cannot resume).
    epochs : int
        Maximum epochs per cycle.
    lr, batch_size, momentum, weight_decay
        Learning rate of the means (and every other parameter), ``batch_size`` volumes per
        process and step, SGD's momentum, weight decay.
    optimizer : str
        ``"auto"`` (the strategy's default: ``"natural"`` for the variational strategies,
        ``"adam"`` for the others), ``"natural"``, ``"adam"`` or ``"sgd"``
        (:class:`dwp.optim.OptimizerName`).
    scale_rate : float
        ``natural``: the rate of the natural-gradient step on the posterior scales
        (:class:`dwp.optim.NaturalVI`); the scheduler anneals it with the learning rate.
    lr_factor, lr_patience, min_lr
        ``ReduceLROnPlateau`` on the validation loss; a cycle ends once the learning rate
        of the first parameter group is at ``min_lr``.
    val_every : int
        Validate every ``val_every`` epochs and at the end of every cycle (tiny training
        sets have epochs of one or two steps, so validating each one can cost more than
        training). The scheduler and the best checkpoint only see validated epochs, so
        ``lr_patience`` counts validations.
    restarts : int
        Cyclical restarts: after each of the first ``restarts`` cycles, reset the
        learning rate and continue; every cycle's final model is saved as
        ``source_restart{i}.pt`` when ``restarts > 0``.
    swag_rank, swag_start, swag_every : int
        Collect the SWA moments of the network's conv weights along training
        (:class:`dwp.SWAGMoments`, what a :class:`dwp.SWAGPrior` is made of) with
        ``swag_rank`` deviation columns (0: no collection), a snapshot after every
        ``swag_every``-th optimisation step from epoch ``swag_start`` of each cycle on.
        Written to ``swag.pt`` at the end of the run; with restarts each cycle is a
        trajectory of its own: its moments go to ``swag_restart{i}.pt`` beside
        ``source_restart{i}.pt`` and the next cycle starts afresh (``swag.pt`` holds the
        last cycle's).
    seed : int
        Seeds model initialisation, data order and weight noise.
    in_channels, n_classes, widths, out_bias
        The U-Net (:class:`unet3d.model.UNet3D`); ``out_bias`` gives its output conv a
        bias (not in the reference network; the all-background trap,
        :mod:`unet3d.losses`).
    size, binarise, modality, normalise, label_map
        :class:`unet3d.data.SegmentationDataset` options for :class:`~unet3d.data.Case`
        lists (ignored for ready datasets).  ``modality`` is one channel of 4D images
        (an int) or several (a sequence, kept as a tuple; one element is that int);
        ``label_map`` a table of label values (``{1: 1, 2: 1, 4: 1}``: BraTS whole
        tumour), the values it leaves out become 0 (:func:`check_label_map`).
    spacing, orientation, crop_foreground
        Resample every volume to ``spacing`` mm (one number or 3, along the array axes
        after reorientation), reorient it to ``orientation`` (``"RAS"``...) and crop it to
        its foreground box on load (:class:`unet3d.spatial.Spatial`, :attr:`spatial`);
        ``None`` / ``False`` (default): the file's grid, as the paper.
    patch_size : int or 3 ints, optional
        Train on random patches of this size (each side a multiple of 8, at least 16)
        cut from the cached whole volumes, drawn anew every epoch from ``(seed, epoch,
        item)``, and validate with sliding windows of this size.  ``None`` (default):
        whole volumes, as the paper.
    pos_fraction : float
        With ``patch_size``: the share of patches centred on a foreground voxel (MONAI's
        ``RandCropByPosNegLabeld`` with ``pos = pos_fraction``, ``neg = 1 - pos_fraction``),
        in [0, 1]; the others are centred on a background voxel.
    patches_per_volume : int
        With ``patch_size``: patches drawn from each training volume per epoch (an epoch
        has ``patches_per_volume`` times as many items).
    augmentation : Augmentation, optional
        Random flips, rotations and intensity changes of the training volumes, drawn anew
        every epoch from ``(seed, epoch, volume)`` only (so a resumed run sees the same
        draws); validation volumes are never augmented.  ``None`` (default, the paper):
        none.  ``True`` stands for ``Augmentation()`` and a mapping for
        ``Augmentation(**mapping)`` (what :meth:`as_dict` stores).  :func:`train` applies
        it to the :class:`~unet3d.data.Case` lists it loads; a ready training dataset
        must augment alike itself (``SegmentationDataset(augment=augmentation,
        seed=seed)``), a ready validation dataset not at all, else ``ValueError``.
    shuffle : bool
        Reshuffle the training set every epoch (seeded by ``(seed, epoch)``).
    progress : bool
        A tqdm progress bar over epochs (rank 0 only).
    num_workers : int
        DataLoader workers.
    tensorboard : str or Path, optional
        Also log every optimiser step's scalars and the validation metrics as TensorBoard
        events in this folder (rank 0; needs ``pip install "dwp[tensorboard]"``;
        :class:`unet3d.run_files.RunLog`).  Where a run is watched from is not part of
        the run: :meth:`as_dict` leaves it out, so checkpoints, resume checks and
        benchmark records never see it.
    device : str
        Where the run computes: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"`` or ``"mps"``
        (a :class:`torch.device` is taken as its name).  Checked to exist on this machine
        when the config is made (``ValueError`` naming ``device``); under torchrun each
        process of a CUDA run uses ``cuda:<LOCAL_RANK>`` (:mod:`unet3d.devices`).  Not
        part of the run either, as ``tensorboard``: a run may resume on another device,
        and CPU results are bit for bit those of a config without it.
    amp : {"off", "bf16", "fp16"}
        Mixed precision (:mod:`dwp.amp`): the network's forward pass under autocast to
        bfloat16 (CPU, Ampere+ GPUs) or float16 (CUDA, with a loss scale), the KL, the
        posterior's log-scales and the ELBO in float32; validation runs in float32.
        ``"off"`` (default): float32 throughout.  Checked against ``device`` when the
        config is made (``ValueError`` naming ``amp``).  Part of the run (it changes the
        numbers): a run resumes with the precision it started with.
    """

    strategy: str = "random_init"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    out_dir: str | os.PathLike | None = None
    epochs: int = 100
    lr: float = 1e-3
    batch_size: int = 2
    optimizer: Literal["auto", "natural", "adam", "sgd"] = "auto"
    scale_rate: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_factor: float = 0.1
    lr_patience: int = 10
    min_lr: float = 1e-6
    val_every: int = 1
    restarts: int = 0
    swag_rank: int = 0
    swag_start: int = 0
    swag_every: int = 1
    seed: int = 0
    in_channels: int = 1
    n_classes: int = 2
    widths: tuple[int, ...] = (16, 32, 32, 64)
    out_bias: bool = False
    size: int | tuple[int, int, int] | None = None
    binarise: bool = True
    modality: int | tuple[int, ...] | None = None
    normalise: Literal["minmax", "zscore"] | None = "minmax"
    label_map: dict[int, int] | None = None
    spacing: float | tuple[float, float, float] | None = None
    orientation: str | None = None
    crop_foreground: bool = False
    patch_size: int | tuple[int, int, int] | None = None
    pos_fraction: float = 0.5
    patches_per_volume: int = 1
    augmentation: Augmentation | None = None
    shuffle: bool = True
    progress: bool = True
    num_workers: int = 0
    tensorboard: str | os.PathLike | None = None
    device: str = "cpu"
    amp: Literal["off", "bf16", "fp16"] = "off"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.val_every < 1 or self.restarts < 0:
            raise ValueError(
                "epochs, batch_size and val_every must be >= 1 and restarts >= 0, got "
                f"{self.epochs}, {self.batch_size}, {self.val_every}, {self.restarts}"
            )
        if self.swag_rank < 0 or self.swag_start < 0 or self.swag_every < 1:
            raise ValueError(
                "swag_rank and swag_start must be >= 0 and swag_every >= 1, got "
                f"{self.swag_rank}, {self.swag_start}, {self.swag_every}"
            )
        if self.optimizer not in ("auto", "natural", "adam", "sgd"):
            raise ValueError(
                f"optimizer must be 'auto', 'natural', 'adam' or 'sgd', got {self.optimizer!r}"
            )
        if not 0 < self.scale_rate <= 1:
            raise ValueError(f"scale_rate must be in (0, 1], got {self.scale_rate}")
        if not 0 < self.lr_factor < 1:
            raise ValueError(f"lr_factor must be in (0, 1), got {self.lr_factor}")
        self.augmentation = _as_augmentation(self.augmentation)
        self.modality = _as_modality(self.modality)
        self.label_map = check_label_map(self.label_map)
        if self.label_map and not self.binarise and max(self.label_map.values()) >= self.n_classes:
            raise ValueError(
                f"label_map maps to {max(self.label_map.values())}, outside the "
                f"{self.n_classes} classes (n_classes)"
            )
        if self.spacing is not None or self.orientation is not None:
            spatial = self.spatial  # checks them, naming the field; imported only then
            self.spacing, self.orientation = spatial.spacing, spatial.orientation
        self.patch_size = check_patch(self.patch_size, "patch_size")
        if not (isinstance(self.pos_fraction, Real) and 0 <= self.pos_fraction <= 1):
            raise ValueError(f"pos_fraction must be in [0, 1], got {self.pos_fraction!r}")
        if isinstance(self.patches_per_volume, bool) or self.patches_per_volume < 1:
            raise ValueError(
                f"patches_per_volume must be an int >= 1, got {self.patches_per_volume!r}"
            )
        if self.patch_size is None and self.patches_per_volume != 1:
            raise ValueError("patches_per_volume needs patch_size (whole volumes: one each)")
        if self.patch_size is not None and self.size is not None:
            sizes = (self.size,) * 3 if isinstance(self.size, int) else tuple(self.size)
            if any(p > s for p, s in zip(self.patch_size, sizes, strict=True)):
                raise ValueError(
                    f"patch_size {self.patch_size} exceeds the volumes' size {self.size}"
                )
        if not (isinstance(self.device, str) and self.device == "cpu"):
            # imported here: the default needs no torch (the CLI parser imports this module)
            from .devices import resolve_device

            self.device = str(resolve_device(self.device, "device"))
        if self.amp != "off":  # also rejects unknown values
            from dwp.amp import check_precision

            check_precision(self.amp, self.device, "amp")

    @property
    def spatial(self) -> Spatial:
        """``spacing``, ``orientation`` and ``crop_foreground`` as a
        :class:`unet3d.spatial.Spatial`."""
        from .spatial import Spatial

        return Spatial(self.spacing, self.orientation, self.crop_foreground)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly copy (strategy options shown with ``repr`` where not plain,
        ``augmentation`` a dict of its fields or ``None``), without ``tensorboard`` and
        ``device`` (a run is the same run whoever watches it, wherever it computes: its
        records and fingerprints do not change with the device).  With plain strategy
        options, ``TrainConfig(**config.as_dict())`` is the config again (tuples as lists;
        ``device`` and ``tensorboard`` back at their defaults)."""
        out = asdict(self)
        del out["tensorboard"], out["device"]
        out["out_dir"] = None if self.out_dir is None else str(self.out_dir)
        out["strategy_options"] = {k: _plain(v) for k, v in self.strategy_options.items()}
        out["widths"] = list(self.widths)
        # JSON keys are strings: stored so, read back by check_label_map
        if self.label_map is not None:
            out["label_map"] = {str(k): v for k, v in self.label_map.items()}
        return out


def check_modality(value: Any, name: str = "modality") -> tuple[int, ...] | None:
    """The channels of a ``modality=`` argument as a tuple (``3`` -> ``(3,)``), or ``None``.

    Raises
    ------
    ValueError
        Not ``None``, a non-negative int or a non-empty sequence of distinct ones, naming
        ``name``.
    """
    if value is None:
        return None
    values = (
        tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value,)
    )
    if (
        not values
        or len(set(values)) != len(values)
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values)
    ):
        raise ValueError(
            f"{name} must be a non-negative int, a sequence of distinct ones or None, got {value!r}"
        )
    return values


def _as_modality(value: Any) -> int | tuple[int, ...] | None:
    """``TrainConfig.modality``: one channel as an int (what runs of earlier releases
    stored), several as a tuple."""
    channels = check_modality(value)
    return channels if channels is None or len(channels) > 1 else channels[0]


def check_label_map(value: Any, name: str = "label_map") -> dict[int, int] | None:
    """A label table as ``{int: int}`` (string keys, as JSON stores them, read as ints).

    Raises
    ------
    ValueError
        Not ``None`` or a non-empty mapping of non-negative ints to non-negative ints,
        naming ``name``.
    """
    if value is None:
        return None
    try:
        table = {int(k) if isinstance(k, str) else k: v for k, v in dict(value).items()}
    except (TypeError, ValueError):
        table = None
    if not table or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in (*table, *table.values())
    ):
        raise ValueError(
            f"{name} must map label values to label values (non-negative ints, e.g. "
            f"{{1: 1, 2: 1, 4: 1}}), got {value!r}"
        )
    return table


def check_patch(value: Any, name: str = "patch_size") -> tuple[int, int, int] | None:
    """A patch or window size as 3 ints (a cube for one int), or ``None``.

    Raises
    ------
    ValueError
        Not ``None``, one or 3 ints, each a multiple of 8 and at least 16 (the U-Net's three
        stride-2 levels leave 2 voxels, the least its instance norms take), naming ``name``.
    """
    if value is None:
        return None
    sides = tuple(value) if isinstance(value, Sequence) else (value,) * 3
    # 16 and 8: unet3d.inference.MIN_ROI and unet3d.model.SIZE_DIVISOR (they import torch)
    if len(sides) != 3 or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 16 or s % 8 for s in sides
    ):
        raise ValueError(
            f"{name} must be an int or 3 ints, each a multiple of 8 and at least 16, got {value!r}"
        )
    return sides  # type: ignore[return-value]


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value) if not isinstance(value, os.PathLike) else str(value)


def _as_augmentation(
    value: Augmentation | Mapping[str, float] | bool | None,
) -> Augmentation | None:
    """``TrainConfig.augmentation`` as given: ``True`` is the defaults, ``False`` / ``None``
    no augmentation, a mapping its fields (as :meth:`TrainConfig.as_dict` stores them;
    missing ones take the defaults)."""
    if value is None or value is False:
        return None
    if value is True:
        return Augmentation()
    if isinstance(value, Augmentation):
        return value
    if isinstance(value, Mapping):
        known = {item.name for item in fields(Augmentation)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"augmentation: no field {', '.join(map(repr, unknown))} in Augmentation "
                f"(fields: {', '.join(item.name for item in fields(Augmentation))})"
            )
        return Augmentation(**value)
    raise ValueError(
        "augmentation must be an Augmentation, a mapping of its fields, a bool or None, "
        f"got {value!r}"
    )

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
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from numbers import Real
from typing import Any, Literal

__all__ = ["Augmentation", "TrainConfig"]


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
    in_channels, n_classes, widths
        The U-Net (:class:`unet3d.model.UNet3D`).
    size, binarise, modality, normalise
        :class:`unet3d.data.SegmentationDataset` options for :class:`~unet3d.data.Case`
        lists (ignored for ready datasets).
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
    size: int | tuple[int, int, int] | None = None
    binarise: bool = True
    modality: int | None = None
    normalise: Literal["minmax", "zscore"] | None = "minmax"
    augmentation: Augmentation | None = None
    shuffle: bool = True
    progress: bool = True
    num_workers: int = 0
    tensorboard: str | os.PathLike | None = None
    device: str = "cpu"

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
        if not (isinstance(self.device, str) and self.device == "cpu"):
            # imported here: the default needs no torch (the CLI parser imports this module)
            from .devices import resolve_device

            self.device = str(resolve_device(self.device, "device"))

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
        return out


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

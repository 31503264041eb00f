"""The options of a :func:`unet3d.train.train` run: :class:`TrainConfig`.

The defaults are the MRI paper's recipe.  A run's config is stored in its checkpoints
(:meth:`TrainConfig.as_dict`, as JSON), from which :func:`unet3d.checkpoint.load_model`
rebuilds the network and ``unet3d train --resume`` checks that a continued run is the
same run.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["TrainConfig"]


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
    shuffle: bool = True
    progress: bool = True
    num_workers: int = 0
    tensorboard: str | os.PathLike | None = None

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

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly copy (strategy options shown with ``repr`` where not plain),
        without ``tensorboard`` (a run is the same run whoever watches it)."""
        out = asdict(self)
        del out["tensorboard"]
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

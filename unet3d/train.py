"""The one training loop of the ``unet3d`` application; strategies plug in.

:func:`train` runs any :mod:`unet3d.strategies` strategy with the paper's recipe as
defaults: Adam, batch 2, :class:`~torch.optim.lr_scheduler.ReduceLROnPlateau` on the
validation loss (factor 0.1, patience 10), stop when the learning rate reaches its floor
or after ``epochs`` epochs.  With ``restarts=k`` (source training for the deep weight
prior) it runs ``k + 1`` cycles: after each converged cycle the learning rate is reset to
its initial value and a checkpoint ``source_restart{i}.pt`` is kept (cyclical restarts).

Every epoch it logs metrics (``metrics.csv``, ``metrics.json``: training loss terms, the
validation loss and Dice, the learning rate), keeps ``best.pt`` (lowest validation loss)
and ``last.pt`` (model, optimiser, scheduler, epoch, RNG state, history), all written
atomically; both also hold the training config and the strategy's options as JSON strings
(``"config"``, ``"strategy"``), from which :func:`unet3d.inference.load_model` rebuilds the
network (a ``best.pt`` of an earlier run holds only the model, epoch and metrics: the
loader then reads them from the ``last.pt`` beside it).

``resume=True`` continues from ``last.pt`` and reaches bit for bit the same parameters as
an uninterrupted run: the data order of epoch ``e`` depends on ``(seed, e)`` only
(:class:`~torch.utils.data.DistributedSampler` semantics, one replica without DDP), and the
torch RNG state (weight noise of the Bayesian strategies) is checkpointed.

Data parallelism: launched under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set, world size
> 1) it joins a ``gloo`` process group, wraps the model in
:class:`~torch.nn.parallel.DistributedDataParallel` and shards each epoch with a
``DistributedSampler``; ``batch_size`` is then per process (global batch ``R * B``),
the strategy gets the local batch size and the full KL (counted once per global step, see
:mod:`dwp.elbo`), every rank computes the same validation loss, and only rank 0 writes.

The validation loss is the paper's loss (:func:`unet3d.losses.paper_loss`) of the
posterior-mean prediction for every strategy, so that runs of different strategies are
scheduled and selected on the same scale.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from dwp._io import atomic_write

from .data import Case, SegmentationDataset, collate
from .losses import paper_loss
from .strategies import CheckpointError, ModelSpec, Strategy, get_strategy, read_checkpoint

__all__ = ["TrainConfig", "TrainResult", "train"]

CHECKPOINT_VERSION = 1


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
    lr, batch_size, optimizer, momentum, weight_decay
        Optimiser: Adam (default) or SGD, ``batch_size`` volumes per process and step.
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
    """

    strategy: str = "random_init"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    out_dir: str | os.PathLike | None = None
    epochs: int = 100
    lr: float = 1e-3
    batch_size: int = 2
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_factor: float = 0.1
    lr_patience: int = 10
    min_lr: float = 1e-6
    val_every: int = 1
    restarts: int = 0
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

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.val_every < 1 or self.restarts < 0:
            raise ValueError(
                "epochs, batch_size and val_every must be >= 1 and restarts >= 0, got "
                f"{self.epochs}, {self.batch_size}, {self.val_every}, {self.restarts}"
            )
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not 0 < self.lr_factor < 1:
            raise ValueError(f"lr_factor must be in (0, 1), got {self.lr_factor}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly copy (strategy options shown with ``repr`` where not plain)."""
        out = asdict(self)
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


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    model : nn.Module
        The trained network (unwrapped) after the last epoch.
    history : list of dict
        One record per epoch (the rows of ``metrics.csv``).
    best_epoch : int
        Epoch (0-based) of the lowest validation loss, ``-1`` without validation.
    best_val_loss : float
    stop_reason : str
        ``"min_lr"`` (the last cycle converged) or ``"max_epochs"``.
    restart_checkpoints : list of Path
        ``source_restart{i}.pt`` files written (rank 0 with ``out_dir``).
    out_dir : Path or None
    """

    model: nn.Module
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_loss: float
    stop_reason: str
    restart_checkpoints: list[Path]
    out_dir: Path | None


# ---------------------------------------------------------------------------------------------
# Distributed helpers


def _distributed_env() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment, ``(0, 1)`` without it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return (rank, world) if world > 1 else (0, 1)


def _as_dataset(data: Sequence[Case] | Dataset, config: TrainConfig) -> Dataset:
    if isinstance(data, Dataset):
        return data
    cases = list(data)
    if cases and not all(isinstance(c, Case) for c in cases):
        raise TypeError("pass a Dataset or a sequence of unet3d.data.Case")
    return SegmentationDataset(
        cases,
        normalise=config.normalise,
        modality=config.modality,
        binarise=config.binarise,
        size=config.size,
        cache=True,
    )


# ---------------------------------------------------------------------------------------------
# Checkpoints and logs


def _save(payload: dict[str, Any], path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_write(path) as f:
        f.write(buffer.getvalue())


def _write_text(text: str, path: Path) -> None:
    with atomic_write(path) as f:
        f.write(text.encode())


def _write_metrics(history: list[dict[str, Any]], out_dir: Path) -> None:
    _write_text(json.dumps(history, indent=1), out_dir / "metrics.json")
    columns: list[str] = []
    for record in history:
        columns += [k for k in record if k not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    _write_text(text.getvalue(), out_dir / "metrics.csv")


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def _validate(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    """Paper loss (mean over batches, weighted by volumes) and mean foreground Dice of the
    posterior-mean prediction (eval mode)."""
    from .metrics import evaluate  # imports MONAI metrics; only needed with validation

    loss_fn = paper_loss()
    was_training = model.training
    model.eval()
    total, count, predictions, labels = 0.0, 0, [], []
    for batch in loader:
        logits = model(batch["image"])
        total += float(loss_fn(logits, batch["label"])) * logits.shape[0]
        count += logits.shape[0]
        predictions.append(logits.argmax(1))
        labels.append(batch["label"])
    model.train(was_training)
    scores = evaluate(torch.cat(predictions), torch.cat(labels))
    return {"val_loss": total / count, "val_dice": float(scores["dice_mean"])}


# ---------------------------------------------------------------------------------------------
# The loop


def _make_optimizer(config: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)


def _make_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    # every group's floor keeps its ratio to the main learning rate
    floors = [config.min_lr * g["initial_lr"] / config.lr for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.lr_factor, patience=config.lr_patience, min_lr=floors
    )


def _at_floor(optimizer: torch.optim.Optimizer, config: TrainConfig) -> bool:
    return optimizer.param_groups[0]["lr"] <= config.min_lr * (1 + 1e-9)


def train(
    config: TrainConfig,
    train_cases: Sequence[Case] | Dataset,
    val_cases: Sequence[Case] | Dataset | None = None,
    *,
    resume: bool = False,
    strategy: Strategy | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train a U-Net with ``config.strategy``; see the module docstring.

    Parameters
    ----------
    config
        Options (:class:`TrainConfig`).
    train_cases, val_cases
        :class:`~unet3d.data.Case` lists (loaded with the config's data options) or
        datasets whose items are dicts with ``image`` ``(C, D, H, W)`` and ``label``
        ``(D, H, W)`` of one common size.  Without validation data the scheduler sees the
        training loss and no best checkpoint is chosen on validation.
    resume
        Continue from ``out_dir/last.pt`` when it exists (a finished run returns at once).
    strategy
        A ready strategy object instead of ``config.strategy`` / ``strategy_options``.
    on_epoch_end
        Called as ``on_epoch_end(epoch, record)`` after each epoch's files are written;
        an exception it raises stops the run there (``resume=True`` continues it).

    Returns
    -------
    TrainResult
    """
    rank, world = _distributed_env()
    own_group = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        own_group = True
    try:
        return _train(config, train_cases, val_cases, resume, strategy, on_epoch_end, rank, world)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(
    config: TrainConfig,
    train_cases: Sequence[Case] | Dataset,
    val_cases: Sequence[Case] | Dataset | None,
    resume: bool,
    strategy: Strategy | None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None,
    rank: int,
    world: int,
) -> TrainResult:
    strategy = strategy or get_strategy(config.strategy, **config.strategy_options)
    out_dir = None if config.out_dir is None else Path(config.out_dir)
    writer = rank == 0 and out_dir is not None
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)

    train_set = _as_dataset(train_cases, config)
    val_set = None if val_cases is None else _as_dataset(val_cases, config)
    n_data = len(train_set)
    if config.batch_size * world > n_data:
        raise ValueError(
            f"global batch {config.batch_size * world} exceeds the {n_data} training volumes"
        )
    # One replica without DDP: the order of epoch e depends on (seed, e) only, in both cases.
    sampler = DistributedSampler(
        train_set, num_replicas=world, rank=rank, shuffle=config.shuffle, seed=config.seed
    )
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=config.num_workers,
    )
    val_loader = (
        None
        if val_set is None
        else DataLoader(val_set, batch_size=config.batch_size, collate_fn=collate)
    )

    torch.manual_seed(config.seed)
    spec = ModelSpec(config.in_channels, config.n_classes, tuple(config.widths))
    model = strategy.build_model(spec)
    model.train()
    optimizer = _make_optimizer(config, strategy.param_groups(model, config.lr))
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    scheduler = _make_scheduler(config, optimizer)

    epoch, cycle, cycle_epoch, step = 0, 0, 0, 0
    history: list[dict[str, Any]] = []
    best_val, best_epoch = math.inf, -1
    restart_files: list[Path] = []
    finished, stop_reason = False, "max_epochs"
    last = None if out_dir is None else out_dir / "last.pt"
    if resume and last is not None and last.exists():
        state = read_checkpoint(last)
        missing = {"model", "optimizer", "scheduler", "epoch", "history"} - set(state)
        if missing:
            raise CheckpointError(
                f"{last}: not a unet3d training checkpoint (missing {sorted(missing)})"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        epoch, cycle, cycle_epoch, step = (
            state["epoch"],
            state["cycle"],
            state["cycle_epoch"],
            state["step"],
        )
        history = list(state["history"])
        best_val, best_epoch = state["best_val_loss"], state["best_epoch"]
        restart_files = [Path(p) for p in state["restart_checkpoints"]]
        finished, stop_reason = state["finished"], state["stop_reason"]
        torch.set_rng_state(state["torch_rng"])
    else:
        torch.manual_seed(config.seed + 1)  # weight-noise stream, independent of the init

    net: nn.Module = DistributedDataParallel(model) if world > 1 else model
    bar = tqdm(
        total=config.epochs * (config.restarts + 1),
        initial=epoch,
        disable=not (config.progress and rank == 0),
        desc=f"{strategy.name}",
        unit="epoch",
    )
    while not finished:
        sampler.set_epoch(epoch)
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        started = time.perf_counter()
        sums: dict[str, float] = {}
        batches = 0
        for batch in loader:
            image, label = batch["image"], batch["label"]
            optimizer.zero_grad(set_to_none=True)
            logits = net(image)
            loss, terms = strategy.loss(model, logits, label, n_data, image.shape[0], step)
            loss.backward()
            optimizer.step()
            step += 1
            batches += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
        record: dict[str, Any] = {
            "epoch": epoch,
            "cycle": cycle,
            "step": step,
            "lr": optimizer.param_groups[0]["lr"],
        }
        record.update({f"train_{k}": v / max(batches, 1) for k, v in sums.items()})
        validated = val_loader is not None and (
            (cycle_epoch + 1) % config.val_every == 0 or cycle_epoch + 1 >= config.epochs
        )
        if val_loader is None:
            monitored = record["train_loss"]
            if world > 1:  # every rank must step its scheduler alike
                value = torch.tensor([monitored], dtype=torch.float64)
                dist.all_reduce(value)
                monitored = float(value) / world
        elif validated:
            record.update(_validate(model, val_loader))
            monitored = record["val_loss"]
        else:
            monitored = None
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        if monitored is not None:
            scheduler.step(monitored)
        improved = validated and monitored < best_val
        if improved:
            best_val, best_epoch = monitored, epoch
        epoch += 1
        cycle_epoch += 1

        cycle_done = _at_floor(optimizer, config) or cycle_epoch >= config.epochs
        if cycle_done:
            stop_reason = "min_lr" if _at_floor(optimizer, config) else "max_epochs"
            if config.restarts > 0:
                path = None if out_dir is None else out_dir / f"source_restart{cycle}.pt"
                if writer:
                    _save({"model": model.state_dict(), "epoch": epoch - 1, "cycle": cycle}, path)
                if path is not None:
                    restart_files.append(path)
            if cycle < config.restarts:  # restart: initial learning rates, fresh plateau state
                cycle += 1
                cycle_epoch = 0
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"]
                scheduler = _make_scheduler(config, optimizer)
            else:
                finished = True

        if writer:
            # What a reader needs to rebuild the network (unet3d.inference.load_model), in
            # both checkpoints: best.pt is the one usually deployed.
            described = {
                "version": CHECKPOINT_VERSION,
                "config": json.dumps(config.as_dict()),
                "strategy": json.dumps(strategy.describe(), default=repr),
            }
            if improved:
                _save(
                    {
                        **described,
                        "model": model.state_dict(),
                        "epoch": epoch - 1,
                        "metrics": record,
                    },
                    out_dir / "best.pt",
                )
            _save(
                {
                    **described,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                    "cycle": cycle,
                    "cycle_epoch": cycle_epoch,
                    "step": step,
                    "history": history,
                    "best_val_loss": best_val,
                    "best_epoch": best_epoch,
                    "restart_checkpoints": [str(p) for p in restart_files],
                    "finished": finished,
                    "stop_reason": stop_reason,
                    "torch_rng": torch.get_rng_state(),
                },
                last,
            )
            _write_metrics(history, out_dir)
        if world > 1:
            dist.barrier()  # last.pt is complete before any rank may stop
        bar.update(1)
        bar.set_postfix({k: f"{record[k]:.4g}" for k in ("train_loss", "val_dice") if k in record})
        if on_epoch_end is not None:
            on_epoch_end(epoch - 1, record)
    bar.close()
    return TrainResult(
        model=model,
        history=history,
        best_epoch=best_epoch,
        best_val_loss=best_val,
        stop_reason=stop_reason,
        restart_checkpoints=restart_files,
        out_dir=out_dir,
    )

"""The one training loop of the ``unet3d`` application; strategies plug in.

:func:`train` runs any :mod:`unet3d.strategies` strategy with the paper's recipe as
defaults: Adam, batch 2, :class:`~torch.optim.lr_scheduler.ReduceLROnPlateau` on the
validation loss (factor 0.1, patience 10), stop when the learning rate reaches its floor
or after ``epochs`` epochs.  With ``restarts=k`` (source training for the deep weight
prior) it runs ``k + 1`` cycles: after each converged cycle the learning rate is reset to
its initial value and a checkpoint ``source_restart{i}.pt`` is kept (cyclical restarts).
With ``swag_rank > 0`` it collects the SWA moments of the weights along the way
(:class:`dwp.SWAGMoments`, after the optimiser steps ``TrainConfig`` chooses) and writes
them to ``swag.pt`` (and per cycle to ``swag_restart{i}.pt``): the source of a
:class:`dwp.SWAGPrior`.

Every epoch it logs metrics (``metrics.csv``, ``metrics.json``: training loss terms, the
validation loss and Dice, the learning rate); every optimiser step its loss terms, learning
rates and posterior scales go to ``steps.csv`` (and TensorBoard with ``config.tensorboard``),
drawn in ``curves.png`` (:class:`unet3d.run_files.RunLog`).  It keeps ``best.pt`` (lowest
validation loss) and ``last.pt`` (model, optimiser, scheduler, epoch, RNG state, history),
all written atomically; both also hold the training config and the strategy's options,
from which :func:`unet3d.checkpoint.load_model` rebuilds the network.  The checkpoint
format is :mod:`unet3d.checkpoint`'s alone.  The metrics files are a view of ``last.pt``'s
history, rewritten from it on resume (which also drops the steps logged after it).  A new
run refuses a folder holding another run's files unless told to replace them
(``overwrite=True``; :mod:`unet3d.run_files`).  Only rank 0 writes or logs under DDP.

``resume=True`` continues from ``last.pt`` and reaches bit for bit the same parameters as
an uninterrupted run: the data order and augmentation of epoch ``e`` depend on ``(seed, e)``
only (:class:`~torch.utils.data.DistributedSampler` semantics, one replica without DDP); the
torch RNG state (weight noise of the Bayesian strategies) and the SWAG collector are
checkpointed.

Devices: ``config.device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``) holds the model (built on
the CPU, so that its initial weights are the same everywhere, then moved with its priors
and buffers), every batch and the optimiser state; the metrics are Python floats and the
checkpoints load on the CPU (:func:`dwp.io.load_torch_file`), so a run resumes on another
device.  The device is not part of the run (:meth:`TrainConfig.as_dict` leaves it out).
Bit for bit holds on the CPU: ``last.pt`` keeps the CPU's RNG only, so a resumed GPU run
draws its weight noise from ``(seed, step)`` (:func:`unet3d.devices.reseed_device`).

Data parallelism: launched under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set, world size
> 1) it joins a process group (:func:`unet3d.devices.process_group`: ``nccl`` on CUDA, each
rank on ``cuda:<LOCAL_RANK>``, ``gloo`` otherwise), wraps the model in
:class:`~torch.nn.parallel.DistributedDataParallel` and shards each epoch with a
``DistributedSampler``; ``batch_size`` is then per process (global batch ``R * B``),
the strategy gets the local batch size and the full KL (counted once per global step, see
:mod:`dwp.elbo`), every rank computes the same validation loss, and only rank 0 writes.

Mixed precision (``config.amp``, :mod:`dwp.amp`): the network's forward pass runs under
autocast (bf16, or fp16 with a loss scale on CUDA); the strategy's loss gets float32
logits, the KL runs with autocast off and the parameters (the posterior's log-scales among
them) stay float32, so the ELBO is float32; validation runs in float32.  An fp16 run's loss
scale is not checkpointed: a resumed run starts it afresh (it adapts within a few steps).

The validation loss is the paper's loss (:func:`unet3d.losses.paper_loss`) of the
posterior-mean prediction for every strategy, so that runs of different strategies are
scheduled and selected on the same scale.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from dwp import amp
from dwp.elbo import LossGuard
from dwp.io import clean_stale_temporaries
from dwp.swag import SWAGMoments

from . import checkpoint, devices, run_files
from .checkpoint import RunDescription, TrainingState
from .config import TrainConfig
from .data import Case
from .strategies import ModelSpec, Strategy, get_strategy
from .train_data import TrainData, load_data, validate

__all__ = ["TrainConfig", "TrainResult", "train"]

Scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau


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
    moments : SWAGMoments or None
        The SWA moments of the last cycle (``swag_rank > 0``), as in ``swag.pt``.
    """

    model: nn.Module
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_loss: float
    stop_reason: str
    restart_checkpoints: list[Path]
    out_dir: Path | None
    moments: SWAGMoments | None = None


# ---------------------------------------------------------------------------------------------
# Model, optimiser, scheduler


def _make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> Scheduler:
    # every group's floor keeps its ratio to the main learning rate
    floors = [config.min_lr * g["initial_lr"] / config.lr for g in optimizer.param_groups]
    return Scheduler(
        optimizer, mode="min", factor=config.lr_factor, patience=config.lr_patience, min_lr=floors
    )


def _at_floor(optimizer: torch.optim.Optimizer, config: TrainConfig) -> bool:
    return optimizer.param_groups[0]["lr"] <= config.min_lr * (1 + 1e-9)


def _build(
    config: TrainConfig, strategy: Strategy, device: torch.device
) -> tuple[nn.Module, torch.optim.Optimizer, SWAGMoments | None]:
    """The strategy's network (seeded by ``config.seed``) on ``device``, its optimiser and
    its SWAG collector."""
    torch.manual_seed(config.seed)
    spec = ModelSpec(config.in_channels, config.n_classes, tuple(config.widths), config.out_bias)
    model = strategy.build_model(spec)
    model.train()
    # SWAG moments are float64, which MPS lacks: there they stay on the CPU (snapshots are
    # copied over); elsewhere they live beside the weights
    moments = _moments(config, model) if device.type == "mps" else None
    # built on the CPU, so that the initial weights are the same on every device, and moved
    # (priors and buffers too) before the optimiser creates its state beside the parameters
    model.to(device)
    if moments is None:
        moments = _moments(config, model)
    optimizer = strategy.make_optimizer(
        model,
        config.optimizer,
        config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        scale_rate=config.scale_rate,
    )
    for group in optimizer.param_groups:  # what a restart resets the learning rates to
        group["initial_lr"] = group["lr"]
    return model, optimizer, moments


def _start(
    config: TrainConfig,
    out_dir: Path | None,
    resume: bool,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler,
    moments: SWAGMoments | None,
    scaler: torch.amp.GradScaler,
) -> TrainingState:
    """A fresh state, or the one of ``out_dir/last.pt`` with the states it restores (on
    the model's device, whichever device the run was on before)."""
    last = None if out_dir is None else out_dir / "last.pt"
    if not (resume and last is not None and last.exists()):
        torch.manual_seed(config.seed + 1)  # weight-noise stream, independent of the init
        return TrainingState()
    point = checkpoint.read_resume_point(last)
    model.load_state_dict(point.model)
    optimizer.load_state_dict(point.optimizer)
    scheduler.load_state_dict(point.scheduler)
    torch.set_rng_state(point.torch_rng)
    device = next(model.parameters()).device
    devices.restore_device_rng(device, point.device_rng, config.seed, point.state.step)
    if point.grad_scaler is not None and scaler.is_enabled():
        scaler.load_state_dict(point.grad_scaler)  # fp16's loss scale, not 2^16 again
    if moments is not None:
        _restore_moments(moments, point.swag, last)
    return point.state


def _moments(config: TrainConfig, model: nn.Module) -> SWAGMoments | None:
    """The run's SWAG collector over every conv weight (``None`` with ``swag_rank=0``)."""
    return SWAGMoments.for_model(model, config.swag_rank) if config.swag_rank > 0 else None


def _restore_moments(moments: SWAGMoments, state: dict | None, last: Path) -> None:
    if state is None:
        raise checkpoint.CheckpointError(
            f"{last}: holds no SWAG moments to continue (the run was started with "
            "swag_rank=0); resume it with swag_rank=0 or start a new run"
        )
    try:
        moments.load_state_dict(state)
    except ValueError as error:
        raise checkpoint.CheckpointError(f"{last}: {error}") from error


# ---------------------------------------------------------------------------------------------
# One epoch


@dataclass
class _Run:
    """What one training run works with; the scheduler is replaced at each restart."""

    config: TrainConfig
    strategy: Strategy
    data: TrainData
    model: nn.Module
    net: nn.Module  # the DDP wrapper of model, or model itself
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    world: int
    device: torch.device  # this process's (cuda:<LOCAL_RANK> under DDP on CUDA)
    out_dir: Path | None
    writer: bool  # rank 0 with an out_dir: the process that writes files
    moments: SWAGMoments | None  # the SWAG collector (swag_rank > 0)
    guard: LossGuard = field(default_factory=LossGuard)  # stops a diverged run before its step
    # fp16's loss scale; a pass-through otherwise
    scaler: torch.amp.GradScaler = field(default_factory=lambda: amp.grad_scaler("off", "cpu"))
    log: run_files.RunLog | None = None  # what rank 0 logs to be watched (steps.csv, TensorBoard)


def _train_epoch(run: _Run, state: TrainingState) -> dict[str, Any]:
    """One pass over the training data; returns the epoch's record (mean loss terms)."""
    run.data.start_epoch(state.epoch)
    n_data = len(run.data.train_set)
    sums: dict[str, float] = {}
    batches = 0
    for batch in run.data.loader:
        image, label = devices.batch_to(batch, run.device)
        run.optimizer.zero_grad(set_to_none=True)
        with amp.autocast(run.config.amp, run.device):  # the network alone (dwp.amp)
            logits = run.net(image)
        # the data term, the KL (float32 whatever the autocast) and the ELBO in float32;
        # a no-op without mixed precision
        loss, terms = run.strategy.loss(
            run.model, logits.float(), label, n_data, image.shape[0], state.step
        )
        if run.log is not None:  # before the check: a diverging step is worth seeing
            run.log.step(state.step, terms, run.model, run.optimizer)
        _check_loss(run, state, terms)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)  # skipped when fp16 gradients overflowed
        run.scaler.update()
        state.step += 1
        _collect_moments(run, state)
        batches += 1
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
    record: dict[str, Any] = {
        "epoch": state.epoch,
        "cycle": state.cycle,
        "step": state.step,
        "lr": run.optimizer.param_groups[0]["lr"],
    }
    record.update({f"train_{k}": v / max(batches, 1) for k, v in sums.items()})
    return record


def _check_loss(run: _Run, state: TrainingState, terms: dict[str, float]) -> None:
    """Stop before the step on a non-finite or diverged data term (``dwp.LossGuard``; the
    data term, not the loss, since an annealed KL weight legitimately raises the loss)."""
    # the ranks' mean: one rank raising alone would leave the others waiting in DDP's
    # gradient all-reduce, and NaN / inf / a blow-up on any rank reaches the mean
    value = devices.mean_over_ranks(terms.get("data_term", terms["loss"]), run.world, run.device)
    run.guard.check(value, step=state.step, name="data term")


def _collect_moments(run: _Run, state: TrainingState) -> None:
    """A SWAG snapshot after every ``swag_every``-th step from cycle epoch ``swag_start``."""
    config = run.config
    if (
        run.moments is not None
        and state.cycle_epoch >= config.swag_start
        and state.step % config.swag_every == 0
    ):
        run.moments.update(run.model)


def _monitor(run: _Run, state: TrainingState, record: dict[str, Any]) -> tuple[float | None, bool]:
    """The loss the scheduler sees this epoch (``None``: no validation this epoch), and
    whether it is a validation loss; validation metrics go into ``record``."""
    config, val_loader = run.config, run.data.val_loader
    if val_loader is None:  # every rank must step its scheduler alike: the ranks' mean
        return devices.mean_over_ranks(record["train_loss"], run.world, run.device), False
    last_of_cycle = state.cycle_epoch + 1 >= config.epochs
    if (state.cycle_epoch + 1) % config.val_every == 0 or last_of_cycle:
        record.update(validate(run.model, val_loader, run.device))
        return record["val_loss"], True
    return None, False


def _end_cycle(run: _Run, state: TrainingState) -> None:
    """After a cycle's last epoch: keep the restart checkpoint, then restart or finish."""
    config, optimizer = run.config, run.optimizer
    state.stop_reason = "min_lr" if _at_floor(optimizer, config) else "max_epochs"
    if config.restarts > 0 and run.out_dir is not None:
        path = run.out_dir / f"source_restart{state.cycle}.pt"
        if run.writer:
            checkpoint.save_restart(path, run.model, epoch=state.epoch - 1, cycle=state.cycle)
            if run.moments is not None:
                run.moments.save(run.out_dir / f"swag_restart{state.cycle}.pt")
        state.restart_checkpoints.append(path)
    if state.cycle < config.restarts:  # restart: initial learning rates, fresh plateau state
        run.guard.reset()
        if run.moments is not None:  # a new trajectory, around another solution
            run.moments.reset()
        state.cycle += 1
        state.cycle_epoch = 0
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        run.scheduler = _make_scheduler(config, optimizer)
    else:
        state.finished = True


def _epoch(run: _Run, state: TrainingState) -> tuple[dict[str, Any], bool]:
    """Train and monitor one epoch, step the schedule; returns the record and whether the
    epoch is the best so far."""
    started = time.perf_counter()
    record = _train_epoch(run, state)
    monitored, validated = _monitor(run, state, record)
    record["seconds"] = time.perf_counter() - started
    state.history.append(record)
    if monitored is not None:
        run.scheduler.step(monitored)
    improved = validated and monitored < state.best_val_loss
    if improved:
        state.best_val_loss, state.best_epoch = monitored, state.epoch
    state.epoch += 1
    state.cycle_epoch += 1
    if _at_floor(run.optimizer, run.config) or state.cycle_epoch >= run.config.epochs:
        _end_cycle(run, state)
    return record, improved


# ---------------------------------------------------------------------------------------------
# Files


def _save(
    run: _Run, state: TrainingState, described: RunDescription, record: dict, improved: bool
) -> None:
    """The epoch's files (rank 0): ``best.pt`` if it improved, ``swag.pt`` after the last
    epoch (before ``last.pt`` says the run is finished), ``last.pt``, the metrics."""
    if improved:
        checkpoint.save_best(
            run.out_dir / "best.pt", run.model, described, epoch=state.epoch - 1, metrics=record
        )
    swag = None if run.moments is None else run.moments.state_dict()
    if swag is not None and state.finished:
        run.moments.save(run.out_dir / "swag.pt")
    checkpoint.save_last(
        run.out_dir / "last.pt", run.model, run.optimizer, run.scheduler, described, state, swag,
        device_rng=devices.device_rng_state(run.device),
        grad_scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None,
    )  # fmt: skip
    run_files.write_metrics(state.history, run.out_dir)


def _progress_bar(run: _Run, state: TrainingState, rank: int) -> tqdm:
    config = run.config
    return tqdm(
        total=config.epochs * (config.restarts + 1),
        initial=state.epoch,
        disable=not (config.progress and rank == 0),
        desc=f"{run.strategy.name}",
        unit="epoch",
    )


# ---------------------------------------------------------------------------------------------
# The loop


def train(
    config: TrainConfig,
    train_cases: Sequence[Case] | Dataset,
    val_cases: Sequence[Case] | Dataset | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    strategy: Strategy | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train a U-Net with ``config.strategy``; see the module docstring.

    Parameters
    ----------
    config
        Options (:class:`TrainConfig`).
    train_cases, val_cases
        :class:`~unet3d.data.Case` lists (loaded with the config's data options, the
        training ones augmented with ``config.augmentation``) or datasets whose items are
        dicts with ``image`` ``(C, D, H, W)`` and ``label`` ``(D, H, W)`` of one common
        size, used as they are (:func:`~unet3d.data.check_augmentation`: they must augment
        as the config says).  Without validation data the scheduler sees the training loss
        and no best checkpoint is chosen on validation.
    resume
        Continue from ``out_dir/last.pt`` when it exists (a finished run returns at once,
        its metrics files rewritten from ``last.pt``); without it, start afresh, removing
        what is left of a run that cannot be continued (:mod:`unet3d.run_files`).
    overwrite
        Start afresh in an ``out_dir`` that holds a previous run's files, removing them
        first; without it (or ``resume``) such a folder is refused, so that an old
        ``best.pt`` never passes for the new run's.
    strategy
        A ready strategy object instead of ``config.strategy`` / ``strategy_options``.
    on_epoch_end
        Called as ``on_epoch_end(epoch, record)`` after each epoch's files are written;
        an exception it raises stops the run there (``resume=True`` continues it).

    Returns
    -------
    TrainResult

    Raises
    ------
    unet3d.run_files.RunFolderError
        ``out_dir`` holds a previous run's files, neither ``resume`` nor ``overwrite``.
    ValueError
        A ready dataset that augments otherwise than the config says, or a
        ``config.device`` this machine lacks (checked before anything is written).
    """
    # TrainConfig checked it when made; checked again since a config may be edited after
    device = devices.resolve_device(config.device, "device")
    with devices.process_group(device) as where:
        return _train(
            config, train_cases, val_cases, (resume, overwrite), strategy, on_epoch_end, where
        )


def _train(
    config: TrainConfig,
    train_cases: Sequence[Case] | Dataset,
    val_cases: Sequence[Case] | Dataset | None,
    start: tuple[bool, bool],  # (resume, overwrite)
    strategy: Strategy | None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None,
    where: devices.Placement,
) -> TrainResult:
    rank, world, device = where
    strategy = strategy or get_strategy(config.strategy, **config.strategy_options)
    out_dir = None if config.out_dir is None else Path(config.out_dir)
    writer = rank == 0 and out_dir is not None
    resume, overwrite = start
    if out_dir is not None:  # every rank refuses alike; only the writer removes files
        run_files.prepare_out_dir(out_dir, resume=resume, overwrite=overwrite, clear=writer)
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(out_dir)  # what a killed run's interrupted writes left
    data = load_data(config, train_cases, val_cases, where)
    model, optimizer, moments = _build(config, strategy, device)
    scheduler = _make_scheduler(config, optimizer)
    scaler = amp.grad_scaler(config.amp, device)
    state = _start(config, out_dir, resume, model, optimizer, scheduler, moments, scaler)
    if writer and state.history:
        # a resume: the metrics files may lag last.pt by an epoch (a kill between the two
        # writes); last.pt's history is the record, the files are rewritten from it
        run_files.write_metrics(state.history, out_dir)
    amp.guard_cpu_bf16_conv3d(model, config.amp, device)  # a torch defect, refused (dwp.amp)
    ids = [device.index] if device.type == "cuda" else None  # one GPU per process
    net = DistributedDataParallel(model, device_ids=ids) if world > 1 else model
    log = run_files.RunLog.open(out_dir, config.tensorboard, state.step, rank)
    run = _Run(
        config, strategy, data, model, net, optimizer, scheduler, world, device, out_dir, writer,
        moments, log=log, scaler=scaler,
    )  # fmt: skip
    # what rebuilds the network (checkpoint.load_model), in best.pt and last.pt
    described = RunDescription(config.as_dict(), strategy.describe())

    bar = _progress_bar(run, state, rank)
    try:
        while not state.finished:
            record, improved = _epoch(run, state)
            if writer:
                _save(run, state, described, record, improved)
            if log is not None:
                log.epoch(record, state.history, state.finished)
            if world > 1:
                dist.barrier()  # last.pt is complete before any rank may stop
            bar.update(1)
            postfix = {k: f"{record[k]:.4g}" for k in ("train_loss", "val_dice") if k in record}
            bar.set_postfix(postfix)
            if on_epoch_end is not None:
                on_epoch_end(state.epoch - 1, record)
    finally:
        if log is not None:
            log.close()
    bar.close()
    return TrainResult(
        model=model,
        history=state.history,
        best_epoch=state.best_epoch,
        best_val_loss=state.best_val_loss,
        stop_reason=state.stop_reason,
        restart_checkpoints=state.restart_checkpoints,
        out_dir=out_dir,
        moments=moments,
    )

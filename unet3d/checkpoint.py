"""The ``unet3d`` checkpoint: the one module that writes, reads and checks it.

:func:`unet3d.train.train` writes three kinds of checkpoint into its ``out_dir``, all of
one format (:data:`CHECKPOINT`): a ``torch.save`` dict of tensors and plain values (read
with ``weights_only=True``) holding

* in every file: the header ``format`` (``"unet3d.checkpoint"``), ``format_version`` (1)
  and ``dwp_version``; ``model``, the network's state dict; ``epoch``, the 0-based epoch
  of the weights (``last.pt``: the number of epochs done);
* ``source_restart{k}.pt`` (one per restart cycle): ``cycle``;
* ``best.pt`` (lowest validation loss) and ``last.pt``: ``config``
  (:meth:`unet3d.config.TrainConfig.as_dict`) and ``strategy``
  (:meth:`unet3d.strategies.Strategy.describe`) as JSON strings, what rebuilds the network
  (:class:`RunDescription`); ``best.pt`` also ``metrics``, its epoch's record;
* ``last.pt``: what ``resume=True`` restores: the fields of :class:`TrainingState`,
  ``optimizer``, ``scheduler`` (their state dicts), ``torch_rng`` (torch's RNG state,
  the weight noise) and ``swag``, the state of the run's SWAG collector
  (:meth:`dwp.SWAGMoments.state_dict`; ``None`` when the run collects no moments),
  ``device_rng`` (an accelerator's generator, :func:`unet3d.devices.device_rng_state`;
  ``None`` on the CPU) and ``grad_scaler`` (fp16's loss scale,
  :meth:`torch.amp.GradScaler.state_dict`; ``None`` without fp16).  These three are
  absent in files written before they existed.

The moments themselves (``swag.pt``, ``swag_restart{k}.pt``) are :mod:`dwp.swag`'s files,
not checkpoints.

Versions: a file with a ``format`` entry is checked by :meth:`dwp.io.FileFormat.check`
(this tag, ``format_version`` 1 to :data:`CHECKPOINT`'s version).  Files written before
the header existed have no ``format``; their ``version`` entry (missing in restart files
and in the earliest ``best.pt``) must be :data:`LEGACY_VERSION`, the layout above.  A
newer or unknown version is a :class:`CheckpointError` naming the file and saying to
upgrade.

Besides checkpoints, :func:`read_state_dict` accepts a raw state dict (a source network
saved with ``torch.save(model.state_dict())``); :func:`load_model` rebuilds the trained
network from a checkpoint alone (no prior file, no source file).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import dwp
from dwp.io import FileFormat, LibraryFileError, describe_payload, load_torch_file

from .model import UNet3D

__all__ = [
    "CHECKPOINT",
    "LEGACY_VERSION",
    "CheckpointError",
    "ResumePoint",
    "RunDescription",
    "TrainedModel",
    "TrainingState",
    "load_model",
    "load_source",
    "read_checkpoint",
    "read_resume_point",
    "read_run_description",
    "read_state_dict",
    "save_best",
    "save_last",
    "save_restart",
]

PathLike = str | os.PathLike


class CheckpointError(LibraryFileError):
    """A checkpoint file is unreadable, of another kind or version, or does not fit."""


#: The checkpoint format: every file holds the network's state dict (``"model"``).
CHECKPOINT = FileFormat(
    tag="unet3d.checkpoint",
    version=1,
    keys=("model",),
    error=CheckpointError,
    what="unet3d checkpoint",
)

#: The ``version`` entry of checkpoints written before :data:`CHECKPOINT`'s header: the
#: same layout as ``format_version`` 1.
LEGACY_VERSION = 1


# ---------------------------------------------------------------------------------------------
# What a run is, and where it stands


@dataclass(frozen=True)
class RunDescription:
    """What rebuilds a run's network: its training config and its strategy's options.

    Attributes
    ----------
    config
        :meth:`unet3d.config.TrainConfig.as_dict` (``in_channels``, ``n_classes``,
        ``widths``, and the data options prediction must reuse).
    strategy
        :meth:`unet3d.strategies.Strategy.describe` (at least ``name``).
    """

    config: dict[str, Any]
    strategy: dict[str, Any]

    def entries(self) -> dict[str, str]:
        """The ``config`` and ``strategy`` entries of a checkpoint (JSON strings)."""
        return {
            "config": json.dumps(self.config),
            "strategy": json.dumps(self.strategy, default=repr),
        }


@dataclass
class TrainingState:
    """Where a training run stands: what ``last.pt`` records and ``resume=True`` restores."""

    epoch: int = 0  # epochs done: the next epoch's 0-based index
    cycle: int = 0  # the restart cycle
    cycle_epoch: int = 0  # epochs done in this cycle
    step: int = 0  # optimisation steps done
    # the rows of metrics.csv; a resume rewrites the metrics files from it
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_loss: float = math.inf
    best_epoch: int = -1  # of best_val_loss; -1 before any validation
    restart_checkpoints: list[Path] = field(default_factory=list)  # source_restart{k}.pt
    finished: bool = False  # the last cycle is done
    stop_reason: str = "max_epochs"  # why the last cycle ended: or "min_lr"


#: What ``last.pt`` holds besides the header, the run description and the weights.
_LAST_KEYS = ("optimizer", "scheduler", "torch_rng", *(f.name for f in fields(TrainingState)))


@dataclass(frozen=True)
class ResumePoint:
    """The content of a ``last.pt``: :class:`TrainingState` and the states to restore."""

    state: TrainingState
    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    torch_rng: Tensor
    swag: dict[str, Any] | None = None  # the SWAG collector's state, when there is one
    device_rng: dict[str, Any] | None = None  # an accelerator's generator (devices.py)
    grad_scaler: dict[str, Any] | None = None  # fp16's loss scale


# ---------------------------------------------------------------------------------------------
# Writing


def save_restart(path: PathLike, model: nn.Module, *, epoch: int, cycle: int) -> Path:
    """Write ``source_restart{k}.pt``: a restart cycle's final weights (a kernel set for
    the deep weight prior).

    Parameters
    ----------
    path, model
        The file and the network whose ``state_dict`` it keeps.
    epoch, cycle
        The 0-based epoch of the weights and the restart cycle they end.
    """
    return CHECKPOINT.save({"model": model.state_dict(), "epoch": epoch, "cycle": cycle}, path)


def save_best(
    path: PathLike,
    model: nn.Module,
    run: RunDescription,
    *,
    epoch: int,
    metrics: dict[str, Any],
) -> Path:
    """Write ``best.pt``: the weights of the best validated epoch, with what rebuilds them.

    Parameters
    ----------
    path, model
        The file and the network whose ``state_dict`` it keeps.
    run
        The training config and strategy (what :func:`load_model` rebuilds from).
    epoch, metrics
        The 0-based epoch of the weights and its record.
    """
    entries = {**run.entries(), "model": model.state_dict(), "epoch": epoch, "metrics": metrics}
    return CHECKPOINT.save(entries, path)


def save_last(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    run: RunDescription,
    state: TrainingState,
    swag: Mapping[str, Any] | None = None,
    *,
    device_rng: Mapping[str, Any] | None = None,
    grad_scaler: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``last.pt``: everything :func:`read_resume_point` needs to continue the run
    bit for bit, the RNG states (the weight noise) and fp16's loss scale included.

    Parameters
    ----------
    path, model
        The file and the network whose ``state_dict`` it keeps.
    optimizer, scheduler
        Their ``state_dict`` is kept.
    run
        The training config and strategy (what :func:`load_model` rebuilds from).
    state
        Where the run stands after its last epoch.
    swag
        The SWAG collector's :meth:`~dwp.SWAGMoments.state_dict`, if the run has one.
    device_rng
        :func:`unet3d.devices.device_rng_state` of the run's device (``None`` on the CPU).
    grad_scaler
        The fp16 loss scaler's ``state_dict`` (``None`` when the run has none).
    """
    entries = {
        **run.entries(),
        **{f.name: getattr(state, f.name) for f in fields(state)},
        "restart_checkpoints": [str(p) for p in state.restart_checkpoints],
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "swag": None if swag is None else dict(swag),
        "device_rng": None if device_rng is None else dict(device_rng),
        "grad_scaler": None if grad_scaler is None else dict(grad_scaler),
    }
    return CHECKPOINT.save(entries, path)


# ---------------------------------------------------------------------------------------------
# Reading


def _check(payload: Any, path: PathLike) -> Mapping[str, Any]:
    """``payload`` if it is a checkpoint of a version this code reads (see the module)."""
    if isinstance(payload, Mapping) and "format" in payload:
        CHECKPOINT.check(payload, path)
    elif not isinstance(payload, Mapping) or "model" not in payload:
        raise CheckpointError(
            f"{path}: not a unet3d checkpoint; it holds {describe_payload(payload)}"
        )
    else:  # written before the header: a "version" entry, or none at all
        version = payload.get("version", LEGACY_VERSION)
        if isinstance(version, bool) or version != LEGACY_VERSION:
            raise CheckpointError(
                f"{path}: unet3d checkpoint version {version!r} is not readable by this dwp "
                f"(reads {LEGACY_VERSION} and format versions 1 to {CHECKPOINT.version}): "
                "upgrade dwp to read it"
            )
    if not isinstance(payload["model"], Mapping):
        raise CheckpointError(f"{path}: its 'model' entry is not a state dict")
    return payload


def read_checkpoint(path: PathLike) -> Mapping[str, Any]:
    """A checkpoint's entries, its version checked.

    Raises
    ------
    FileNotFoundError
        No such file.
    CheckpointError
        An unreadable file, not a checkpoint, or a version this code does not read.
    """
    return _check(load_torch_file(path, what="checkpoint", error=CheckpointError), path)


def read_state_dict(path: PathLike) -> dict[str, Tensor]:
    """A network's state dict from ``path``: a checkpoint's ``"model"`` (any of the three
    kinds), or a raw state dict.

    Raises
    ------
    FileNotFoundError
        No such file.
    CheckpointError
        An unreadable file, a checkpoint of an unreadable version, or neither a state
        dict nor a checkpoint.
    """
    payload = load_torch_file(path, what="checkpoint", error=CheckpointError)
    if isinstance(payload, Mapping) and ("format" in payload or "model" in payload):
        return dict(_check(payload, path)["model"])
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"{path}: not a state dict or a unet3d checkpoint; it holds {describe_payload(payload)}"
        )
    return payload


def read_resume_point(path: PathLike) -> ResumePoint:
    """What ``last.pt`` holds to continue a run (see :func:`save_last`).

    Raises
    ------
    CheckpointError
        As :func:`read_checkpoint`, or a checkpoint that is not a ``last.pt``.
    """
    payload = read_checkpoint(path)
    missing = [key for key in _LAST_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"{path}: not a unet3d training checkpoint (missing {missing})")
    state = TrainingState(**{f.name: payload[f.name] for f in fields(TrainingState)})
    state.history = list(state.history)
    state.restart_checkpoints = [Path(p) for p in state.restart_checkpoints]
    return ResumePoint(
        state=state,
        model=payload["model"],
        optimizer=payload["optimizer"],
        scheduler=payload["scheduler"],
        torch_rng=payload["torch_rng"],
        swag=payload.get("swag"),
        device_rng=payload.get("device_rng"),
        grad_scaler=payload.get("grad_scaler"),
    )


def _description(payload: Mapping[str, Any], path: PathLike) -> RunDescription:
    try:
        config = json.loads(payload["config"])
        strategy = json.loads(payload.get("strategy") or "{}")
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: no readable training config ({error!r})") from error
    if not isinstance(config, dict) or not isinstance(strategy, dict):
        raise CheckpointError(f"{path}: the training config is not a JSON object")
    return RunDescription(config, strategy)


def read_run_description(path: PathLike) -> RunDescription:
    """The training config and strategy a ``best.pt`` / ``last.pt`` was written with.

    Raises
    ------
    CheckpointError
        As :func:`read_checkpoint`, or no readable training config in the file.
    """
    return _description(read_checkpoint(path), path)


def _run_description(path: Path, payload: Mapping[str, Any]) -> RunDescription:
    """The run description of a checkpoint, or of the ``last.pt`` beside it."""
    if "config" in payload:
        return _description(payload, path)
    # A best.pt of an earlier layout holds only the model, epoch and metrics; the run's
    # last.pt (same folder, same architecture) still describes it.
    sibling = path.parent / "last.pt"
    if sibling.resolve() == path.resolve() or not sibling.is_file():
        raise CheckpointError(
            f"{path}: no training config in the checkpoint (and no last.pt beside it) "
            "to rebuild the network from"
        )
    described = read_checkpoint(sibling)
    if "config" not in described:
        raise CheckpointError(f"{sibling}: no training config in this checkpoint either")
    return _description(described, sibling)


# ---------------------------------------------------------------------------------------------
# Weights into networks


def _network(model: nn.Module) -> str:
    """``UNet3D(in_channels=1, n_classes=2, widths=(16, 32, 32, 64))``, for messages."""
    shape = ", ".join(
        f"{name}={getattr(model, name)!r}"
        for name in ("in_channels", "n_classes", "widths")
        if hasattr(model, name)
    )
    if getattr(model, "out_bias", False):
        shape += ", out_bias=True"
    return f"{type(model).__name__}({shape})"


def _load_weights(
    model: nn.Module,
    state: Mapping[str, Any],
    path: PathLike,
    *,
    skip: Callable[[str], bool] | None = None,
    advice: str = "check widths / channels",
) -> nn.Module:
    """Load ``state`` (read from ``path``) into ``model`` in place; returns ``model``.

    Parameters
    ----------
    model, state
        The network and the state dict; every entry must fit (same keys, same shapes).
    path
        The file ``state`` comes from, for the message.
    skip
        Keys neither loaded nor required (a prior's entries that a placeholder replaces).
    advice
        What to do when the weights do not fit, appended to the message.

    Raises
    ------
    CheckpointError
        Missing or unexpected entries, or other shapes: the message names the file, the
        network and the first entries at fault (not torch's bare list).
    """
    skip = skip or (lambda key: False)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not skip(k)]
    unexpected = [k for k in state if k not in own and not skip(k)]
    shapes = [
        k
        for k in own.keys() & state.keys()
        if isinstance(own[k], Tensor)
        and isinstance(state[k], Tensor)
        and own[k].shape != state[k].shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path}: the weights do not fit {_network(model)} (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, other shapes {sorted(shapes)[:3]}); {advice}"
        )
    model.load_state_dict({k: v for k, v in state.items() if not skip(k)}, strict=False)
    return model


def load_source(
    model: nn.Module, path: PathLike, *, advice: str = "check widths / channels"
) -> nn.Module:
    """Load the source network ``path`` (a checkpoint or a raw state dict) into ``model``.

    Parameters
    ----------
    model
        The network, loaded in place and returned.
    path
        Any of the three checkpoints of a run, or a raw state dict.
    advice
        What to do when the weights do not fit, for the message.

    Raises
    ------
    CheckpointError
        An unreadable file (:func:`read_state_dict`), or weights of another architecture:
        the message names the file, the network and the first entries at fault.

    Notes
    -----
    A source without an output bias loads into a ``UNet3D(out_bias=True)``: its bias is
    set to zero, so the model computes the source's function (the reverse, a bias the
    model has no room for, is an error).
    """
    state = read_state_dict(path)
    bias = dict(model.named_parameters()).get(_OUT_BIAS)
    added = _OUT_BIAS if bias is not None and _OUT_BIAS not in state else None
    _load_weights(model, state, path, skip=lambda key: key == added, advice=advice)
    if added is not None:
        with torch.no_grad():
            bias.zero_()
    return model


#: The output conv's bias of ``UNet3D(out_bias=True)``, which bias-free sources lack.
_OUT_BIAS = "out.conv.bias"


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


def load_model(checkpoint: PathLike) -> TrainedModel:
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
    CheckpointError
        An unreadable file, one that is not a training checkpoint or of an unreadable
        version, no stored training config, or weights that do not fit the network the
        config describes (naming the file).
    """
    path = Path(checkpoint)
    payload = read_checkpoint(path)
    run = _run_description(path, payload)
    config, state = run.config, payload["model"]
    try:
        base = UNet3D(
            int(config["in_channels"]),
            int(config["n_classes"]),
            tuple(config["widths"]),
            out_bias=bool(config.get("out_bias", False)),  # absent before the option
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"{path}: the training config does not describe a UNet3D ({error!r})"
        ) from error
    suffix = ".weight_log_sigma"
    names = {k[: -len(suffix)] for k in state if k.endswith(suffix)}
    model: nn.Module = base
    if names:
        model = dwp.bayesianize(
            base,
            dwp.NormalPrior(),  # placeholder: see the docstring
            include=lambda name, layer: name in names,
            bayesian_bias=any(k.endswith(".bias_log_sigma") for k in state),
            inplace=True,
        )
        converted = {name for name, _ in dwp.bayesian_layers(model)}
        if converted != names:
            raise CheckpointError(
                f"{path}: Bayesian layers {sorted(names - converted)} are not convolutions "
                f"of UNet3D(widths={tuple(config['widths'])})"
            )
    _load_weights(
        model,
        state,
        path,
        skip=_is_prior_key,
        advice="its stored config does not describe its weights",
    )
    model.eval()
    epoch = payload.get("epoch")
    return TrainedModel(
        model=model,
        config=config,
        strategy=run.strategy,
        bayesian=bool(names),
        path=path,
        # last.pt records the number of epochs done, best.pt the epoch of its weights
        epoch=None if epoch is None else int(epoch) - (1 if "optimizer" in payload else 0),
    )

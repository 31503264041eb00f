"""Watching training: scalars per optimiser step to TensorBoard or a CSV file, the scalars
a Bayesian network offers, and a PNG of training curves.

A training loop hands a :class:`TrainingLogger` ``log_scalars(step, {tag: value})`` once
per optimiser step (and per-epoch values at the epoch's last step); the loggers here
write them to TensorBoard event files (:class:`TensorBoardLogger`, the ``tensorboard``
extra) or to a CSV file in long format (:class:`CSVLogger`: ``step,name,value``, one row
per scalar, so tags may come and go), or both (:class:`MultiLogger`).
:func:`step_scalars` gathers what a step offers under the tags every loop of the
distribution shares:

``train/<term>``
    The loss terms the loop computed (``loss``, ``data_term``, ``kl``, ``beta``...).
``lr/<group>``
    The learning rate of every optimiser parameter group (its ``"name"`` entry, else its
    index).
``posterior_log_sigma/<group>``
    The mean posterior log standard deviation of the Bayesian weights of a group of layers
    (:func:`posterior_log_scales`): whether the weight noise grows or collapses is the
    first thing to watch in variational training.

Resuming
--------
Step numbers are the global optimiser step, so a resumed run continues its curves.  Steps
logged after the checkpoint a run resumes from are logged again, so both loggers take a
``purge_step``: the CSV file drops its rows from that step on, and TensorBoard hides the
events from that step on (its own mechanism, a ``SessionLog.START`` event), so that no
step appears twice.  ``purge_step=0`` starts the log afresh.

Logging only reads the model and the optimiser: a run gives the same weights with or
without it.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from .extras import require
from .io import atomic_write, write_text
from .nn import BayesianLayer
from .select import bayesian_layers

__all__ = [
    "CSVLogger",
    "LogFolderError",
    "MultiLogger",
    "Series",
    "TensorBoardLogger",
    "TrainingLogger",
    "check_tensorboard",
    "layer_group",
    "learning_rates",
    "optional_tensorboard",
    "plot_curves",
    "posterior_log_scales",
    "prepare_log_dir",
    "read_csv_log",
    "step_scalars",
]

#: The columns of a :class:`CSVLogger` file.
CSV_HEADER = ("step", "name", "value")
#: ``(steps, values)`` of one curve.
Series = tuple[Sequence[float], Sequence[float]]


class LogFolderError(ValueError):
    """A logging folder cannot be used: it is a file, or it cannot be created or written
    (a ``ValueError``, as a bad run folder is: the command lines report it in one line)."""


def prepare_log_dir(log_dir: str | os.PathLike) -> Path:
    """Create ``log_dir`` (and its parents) if needed and check that it can be written.

    Loggers call it before training starts, so that a bad folder is one line naming it,
    not a failure in the middle of a run (TensorBoard's writer thread would only print it).

    Raises
    ------
    LogFolderError
        The path is an existing file, or the folder cannot be created or written.
    """
    folder = Path(log_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = "it is a file" if folder.is_file() else (error.strerror or str(error))
        raise LogFolderError(f"{folder}: cannot write training logs there ({reason})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LogFolderError(f"{folder}: cannot write training logs there (not writable)")
    return folder


def check_tensorboard(
    log_dir: str | os.PathLike, *, needed_by: str = "TensorBoard logging"
) -> Path:
    """Check, before any work, that TensorBoard is installed and ``log_dir`` can be
    written (created if needed); returns the folder.

    Raises
    ------
    dwp.extras.MissingExtraError
        TensorBoard is not installed; the message names ``needed_by`` and the extra.
    LogFolderError
        ``log_dir`` cannot be used.
    """
    require("tensorboard", extra="tensorboard", needed_by=needed_by)
    return prepare_log_dir(log_dir)


class TrainingLogger(ABC):
    """Where a training loop sends its scalars; a context manager that closes itself.

    Subclasses implement :meth:`log_scalars`; :meth:`flush` (make what was logged
    visible to a reader now) and :meth:`close` do nothing unless overridden.
    """

    @abstractmethod
    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record ``scalars`` (tag -> value) at optimiser step ``step``."""

    def flush(self) -> None:  # noqa: B027 (an optional hook: a no-op by default)
        """Make what was logged visible to readers (e.g. once per epoch)."""

    def close(self) -> None:  # noqa: B027 (an optional hook: a no-op by default)
        """Flush and release the logger's files; nothing may be logged afterwards."""

    def __enter__(self) -> TrainingLogger:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class TensorBoardLogger(TrainingLogger):
    """Scalars as TensorBoard events in ``log_dir`` (``tensorboard --logdir <parent>``).

    Parameters
    ----------
    log_dir
        The run's event folder, created if needed (:func:`prepare_log_dir`).
    purge_step
        Hide the folder's events from this step on (a resumed run logs them again; ``0``:
        a fresh run replaces the folder's curves).  ``None`` keeps every event.
    flush_secs
        How often events are written to disk at the latest (:meth:`flush` writes at once).
    needed_by
        What needs TensorBoard, for the message when it is not installed (a command line
        passes its option's name).

    Raises
    ------
    dwp.extras.MissingExtraError
        TensorBoard is not installed (``pip install "dwp[tensorboard]"``).
    LogFolderError
        ``log_dir`` cannot be used.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        *,
        purge_step: int | None = None,
        flush_secs: int = 30,
        needed_by: str = "TensorBoard logging",
    ) -> None:
        self.log_dir = check_tensorboard(log_dir, needed_by=needed_by)
        # torch's writer imports TensorBoard itself: imported here, on first use only
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(
            log_dir=str(self.log_dir), purge_step=purge_step, flush_secs=flush_secs
        )

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(value), global_step=int(step))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def optional_tensorboard(
    root: str | os.PathLike | None, *parts: str, **options: Any
) -> AbstractContextManager[TensorBoardLogger | None]:
    """``with optional_tensorboard(root, "model", "run1") as logger:`` a
    :class:`TensorBoardLogger` in ``root/model/run1`` (``options`` passed on), closed at
    the end; ``None`` when ``root`` is ``None`` (logging off: a loop then computes no
    scalars at all).  What a command with a ``--tensorboard ROOT`` option gives each fit."""
    if root is None:
        return nullcontext()
    return TensorBoardLogger(Path(root, *parts), **options)


class CSVLogger(TrainingLogger):
    """Scalars appended to a CSV file, one ``step,name,value`` row each, flushed per call.

    Rows are appended as they come, so a reader (``pandas.read_csv(path).pivot_table(
    index="step", columns="name", values="value")``) sees a live run.  The file is checked
    when opened: a row cut short by a killed process is dropped, and so are the rows from
    ``purge_step`` on; the rest is rewritten atomically before appending resumes.

    Parameters
    ----------
    path
        The CSV file; its folder is created if needed (:func:`prepare_log_dir`).
    purge_step
        Drop the rows of this step and later ones (a resumed run logs them again; ``0``
        starts the file afresh).  ``None`` keeps every row.

    Raises
    ------
    LogFolderError
        The folder cannot be used, or ``path`` holds something other than such a log.
    """

    def __init__(self, path: str | os.PathLike, *, purge_step: int | None = None) -> None:
        self.path = Path(path)
        prepare_log_dir(self.path.parent)
        if self.path.is_dir():
            raise LogFolderError(f"{self.path}: is a folder, not a CSV log file")
        rows = _read_rows(self.path) if self.path.exists() else []
        if purge_step is not None:
            rows = [row for row in rows if row[0] < purge_step]
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        writer.writerows(rows)
        write_text(self.path, text.getvalue())
        self._file = self.path.open("a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file, lineterminator="\n")

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        # repr of a float reads back as the same float: the log holds the exact values
        self._writer.writerows((int(step), name, float(v)) for name, v in scalars.items())
        self._file.flush()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _read_rows(path: Path) -> list[tuple[int, str, float]]:
    """The well-formed rows of a :class:`CSVLogger` file (a cut last row is left out)."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is not None and tuple(header) != CSV_HEADER:
            raise LogFolderError(
                f"{path}: not a training log (its header is {header}, not {list(CSV_HEADER)})"
            )
        rows = []
        for row in reader:
            try:
                step, name, value = row
                rows.append((int(step), name, float(value)))
            except ValueError:  # a row cut short by a killed process
                continue
    return rows


def read_csv_log(path: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """The curves of a :class:`CSVLogger` file: tag -> ``(steps, values)``, in file order."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for step, name, value in _read_rows(Path(path)):
        steps, values = curves.setdefault(name, ([], []))
        steps.append(step)
        values.append(value)
    return curves


class MultiLogger(TrainingLogger):
    """Every scalar to each of ``loggers`` (e.g. a CSV file and TensorBoard)."""

    def __init__(self, *loggers: TrainingLogger) -> None:
        self.loggers = list(loggers)

    def add(self, logger: TrainingLogger) -> None:
        """Log to ``logger`` too (closed with the others)."""
        self.loggers.append(logger)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for logger in self.loggers:
            logger.log_scalars(step, scalars)

    def flush(self) -> None:
        for logger in self.loggers:
            logger.flush()

    def close(self) -> None:
        errors = []
        for logger in self.loggers:  # each one gets closed, whatever the others do
            try:
                logger.close()
            except Exception as error:  # re-raised below, once every logger is closed
                errors.append(error)
        if errors:
            raise errors[0]


# ---------------------------------------------------------------------------------------------
# The scalars of a step


def layer_group(name: str, layer: BayesianLayer) -> str:
    """The group :func:`posterior_log_scales` reports a Bayesian layer in by default.

    The prior's group when the layer's weight prior has one (a deep weight prior's or a
    kernel Gaussian's group of layers, e.g. one per resolution); otherwise the top-level
    module the layer belongs to (``"down1"`` for ``"down1.conv_1.conv"``; the layer's class
    name for a model that is a single layer).
    """
    group = getattr(layer.weight_prior, "group", None)
    if isinstance(group, str):
        return group
    return name.partition(".")[0] or type(layer).__name__


def posterior_log_scales(
    model: nn.Module, group_of: Callable[[str, BayesianLayer], str] = layer_group
) -> dict[str, float]:
    """Mean posterior log standard deviation of the Bayesian weights, per group of layers.

    Parameters
    ----------
    model
        Any network; its Bayesian layers are found by :func:`dwp.bayesian_layers`.
    group_of
        ``(qualified name, layer) -> group`` (default :func:`layer_group`).

    Returns
    -------
    dict of str to float
        Group -> the mean of ``weight_log_sigma`` over every weight of its layers (each
        weight counts once, whatever its layer's size), in module order of the groups'
        first layers; empty for a deterministic network.
    """
    sums: dict[str, list[torch.Tensor]] = {}
    counts: dict[str, int] = {}
    for name, layer in bayesian_layers(model):
        group = group_of(name, layer)
        sums.setdefault(group, []).append(layer.weight_log_sigma.detach().sum())
        counts[group] = counts.get(group, 0) + layer.weight_log_sigma.numel()
    if not sums:
        return {}
    # one transfer from the device for every group (.tolist() waits for it once)
    totals = torch.stack([torch.stack(parts).sum() for parts in sums.values()]).tolist()
    return {group: total / counts[group] for group, total in zip(sums, totals, strict=True)}


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The learning rate of every parameter group: its ``"name"`` entry, else its index."""
    return {
        str(group.get("name", i)): float(group["lr"])
        for i, group in enumerate(optimizer.param_groups)
    }


def step_scalars(
    terms: Mapping[str, float],
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """The scalars of one training step under the shared tags (see the module notes).

    Parameters
    ----------
    terms
        The loss terms the loop computed, as plain numbers (``train/<term>``).
    model
        The network, for ``posterior_log_sigma/<group>`` (:func:`posterior_log_scales`;
        nothing for a deterministic one).  Pass it before the optimiser step, so that the
        scales are those the step's loss was computed with.
    optimizer
        For ``lr/<group>`` (:func:`learning_rates`).
    """
    scalars = {f"train/{name}": float(value) for name, value in terms.items()}
    if optimizer is not None:
        scalars.update({f"lr/{k}": v for k, v in learning_rates(optimizer).items()})
    if model is not None:
        scales = posterior_log_scales(model)
        scalars.update({f"posterior_log_sigma/{k}": v for k, v in scales.items()})
    return scalars


# ---------------------------------------------------------------------------------------------
# Curves

#: Points drawn per curve at most; longer curves are averaged over equal runs of steps.
MAX_POINTS = 2000


def _thin(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    """At most :data:`MAX_POINTS` points: the means of consecutive runs of a long curve
    (a noisy per-step loss reads better averaged than subsampled)."""
    if len(xs) <= MAX_POINTS:
        return list(xs), list(ys)
    size = math.ceil(len(xs) / MAX_POINTS)
    starts = range(0, len(xs), size)
    mean = [sum(xs[i : i + size]) / len(xs[i : i + size]) for i in starts]
    return mean, [sum(ys[i : i + size]) / len(ys[i : i + size]) for i in starts]


def plot_curves(
    path: str | os.PathLike,
    panels: Mapping[str, Mapping[str, Series]],
    *,
    log_y: Collection[str] = (),
    xlabel: str = "optimiser step",
) -> bool:
    """Write a PNG of training curves: one panel per entry of ``panels``.

    Parameters
    ----------
    path
        Output PNG, written atomically (a watcher never sees half an image).
    panels
        Panel title -> curve label -> ``(steps, values)``; empty curves and panels are
        left out.  Curves of many points are averaged down to :data:`MAX_POINTS`.
    log_y
        Titles of the panels drawn on a log scale (where every value is positive).
    xlabel
        The horizontal axis.

    Returns
    -------
    bool
        Whether the PNG was written: ``False`` without matplotlib (the ``plot`` extra),
        with a warning, or without a curve to draw.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        # the default warning filter shows this once per call site, not once per epoch
        warnings.warn(
            'training curves need matplotlib: pip install "dwp[plot]"; no curves.png written',
            stacklevel=2,
        )
        return False
    drawn = {
        title: {label: s for label, s in curves.items() if len(s[0])}
        for title, curves in panels.items()
    }
    drawn = {title: curves for title, curves in drawn.items() if curves}
    if not drawn:
        return False
    columns = min(2, len(drawn))
    rows = math.ceil(len(drawn) / columns)
    # the object-oriented API only: the caller's pyplot state and backend are left alone
    fig = Figure(figsize=(6.0 * columns, 3.2 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (title, curves) in zip(axes, drawn.items(), strict=False):
        for label, (xs, ys) in curves.items():
            xs, ys = _thin(xs, ys)
            marker = "o" if len(xs) <= 50 else None  # per-epoch points stay visible
            ax.plot(xs, ys, label=label, marker=marker, markersize=3, linewidth=1)
        values = [y for xs, ys in curves.values() for y in ys]
        if title in log_y and all(y > 0 for y in values if math.isfinite(y)):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(drawn) :]:
        ax.set_axis_off()
    fig.tight_layout()
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return True

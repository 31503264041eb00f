"""The files of a training run in its folder: which they are, the metrics, starting over.

:func:`unet3d.train.train` writes :data:`RUN_FILES` into its ``out_dir``.  A new run must
not start among another run's files: one that never improves on validation (or has no
validation) would leave the old ``best.pt`` in place, and prediction would silently use
the old model.  :func:`prepare_out_dir` therefore refuses such a folder unless it is to
be replaced (``overwrite``) or the run resumes, and :func:`clear_run_files` removes the
old files first.

The metrics files are a view of ``last.pt``'s history (:func:`write_metrics`): a resume
rewrites them from it, so a run killed between its ``last.pt`` and its metrics gets its
last epoch's row back.

What a run logs to be watched (:class:`RunLog`): every optimiser step's scalars in
:data:`STEP_LOG` (and in TensorBoard with ``TrainConfig.tensorboard``), and its curves in
:data:`CURVES`.  They are not :data:`RUN_FILES`: a new run replaces them (its log starts
again at step 0), so they neither make a folder a previous run's nor need clearing.
"""

from __future__ import annotations

import csv
import io
import os
import time
from array import array
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from dwp.io import write_json, write_text
from dwp.train_log import (
    CSVLogger,
    MultiLogger,
    Series,
    TensorBoardLogger,
    TrainingLogger,
    check_tensorboard,
    plot_curves,
    read_csv_log,
    step_scalars,
)

__all__ = [
    "CURVES",
    "RUN_FILES",
    "STEP_LOG",
    "RunFolderError",
    "RunLog",
    "clear_run_files",
    "curve_panels",
    "prepare_out_dir",
    "previous_run_error",
    "previous_run_files",
    "write_metrics",
]

#: What :func:`unet3d.train.train` writes (glob patterns), in the order
#: :func:`clear_run_files` removes them: ``last.pt`` first, so that a clearing cut short
#: leaves no run to resume, only files that are still refused.
RUN_FILES = (
    "last.pt",
    "best.pt",
    "swag.pt",
    "source_restart*.pt",
    "swag_restart*.pt",
    "metrics.csv",
    "metrics.json",
)


class RunFolderError(ValueError):
    """A run folder holds another run's files where a new run would start."""


def previous_run_files(out_dir: Path, extra: Sequence[str] = ()) -> list[Path]:
    """The files of a previous run in ``out_dir`` (:data:`RUN_FILES`, then ``extra``
    patterns), in removal order; empty for a missing folder."""
    if not out_dir.is_dir():
        return []
    return [path for pattern in (*RUN_FILES, *extra) for path in sorted(out_dir.glob(pattern))]


def clear_run_files(out_dir: Path, extra: Sequence[str] = ()) -> list[Path]:
    """Remove a previous run's files from ``out_dir`` (other files stay); returns them."""
    removed = previous_run_files(out_dir, extra)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def previous_run_error(out_dir: Path, files: Sequence[Path], advice: str) -> RunFolderError:
    """The error refusing ``out_dir`` for ``files`` of a previous run, naming a few."""
    names = [p.name for p in files]
    listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return RunFolderError(f"{out_dir}: holds a previous run's files ({listed}); {advice}")


def prepare_out_dir(out_dir: Path, *, resume: bool, overwrite: bool, clear: bool) -> None:
    """Make ``out_dir`` ready for :func:`unet3d.train.train`, or refuse it.

    A resumable run (``resume`` and ``last.pt``) continues among its files.  Otherwise the
    run starts afresh, and a previous run's files must go: with ``overwrite``, or with
    ``resume`` (there is no ``last.pt`` to continue, so the files are what is left of a
    run that cannot be: cut before its first ``last.pt``, or whose ``last.pt`` was
    removed), they are removed when ``clear`` (the process that writes, under DDP).

    Raises
    ------
    RunFolderError
        A previous run's files, neither ``resume`` nor ``overwrite``.
    ValueError
        Both ``resume`` and ``overwrite``.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue a run or replace it")
    if resume and (out_dir / "last.pt").is_file():
        return
    previous = previous_run_files(out_dir)
    if not previous:
        return
    if not (resume or overwrite):
        raise previous_run_error(
            out_dir,
            previous,
            "continue it with resume=True, replace it with overwrite=True, or use another out_dir",
        )
    if clear:
        clear_run_files(out_dir)


def write_metrics(history: Sequence[dict[str, Any]], out_dir: Path) -> None:
    """Write ``metrics.json`` and ``metrics.csv`` (one row per epoch) from a history."""
    write_json(out_dir / "metrics.json", list(history))
    columns: list[str] = []
    for record in history:
        columns += [k for k in record if k not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text(out_dir / "metrics.csv", text.getvalue())


# ---------------------------------------------------------------------------------------------
# Watching a run

#: The per-step log in the run folder (:class:`dwp.train_log.CSVLogger`: ``step,name,value``).
STEP_LOG = "steps.csv"
#: The training curves in the run folder, drawn from the history and :data:`STEP_LOG`.
CURVES = "curves.png"
#: Seconds between two drawings of :data:`CURVES` while a run trains (a drawing takes
#: about a tenth of a second, an epoch of a tiny training set less); also drawn at the end.
CURVES_EVERY_S = 60.0
#: The per-step curves :data:`CURVES` shows (tags of :func:`dwp.train_log.step_scalars`),
#: besides every ``lr/*`` and ``posterior_log_sigma/*`` one.
_CURVE_TAGS = ("train/loss", "train/data_term", "train/kl", "train/beta")


def _shown(tag: str) -> bool:
    """Whether :data:`CURVES` draws the per-step curve ``tag`` (the others are only logged)."""
    return tag in _CURVE_TAGS or tag.startswith(("lr/", "posterior_log_sigma/"))


class _Curve(NamedTuple):
    """A per-step curve kept for :data:`CURVES`, in typed arrays (16 bytes a point, not
    the 64 of two lists of Python numbers: a source run takes some 10^5 steps)."""

    steps: array
    values: array

    @classmethod
    def of(cls, steps: Sequence[int] = (), values: Sequence[float] = ()) -> _Curve:
        return cls(array("q", steps), array("d", values))


class RunLog:
    """What a run logs to be watched (rank 0 only; :func:`unet3d.train.train`).

    Every optimiser step: the strategy's loss terms, the learning rates and the mean
    posterior log-sigma of each group of Bayesian layers (:func:`dwp.train_log.step_scalars`,
    tags ``train/*``, ``lr/*``, ``posterior_log_sigma/*``), at the global step number.
    Every epoch: the validation metrics (``val/loss``, ``val/dice``) at the epoch's last
    step.  They go to :data:`STEP_LOG` in the run folder and to TensorBoard; :data:`CURVES`
    is redrawn every :data:`CURVES_EVERY_S` seconds and when the run ends.

    Build it with :meth:`open`; the scalars only read the model, so a run trains the same
    weights with or without its log.
    """

    def __init__(self, logger: TrainingLogger, out_dir: Path | None) -> None:
        self.logger = logger
        self.out_dir = out_dir
        self.curves: dict[str, _Curve] = {}
        if out_dir is not None:  # the curves of the steps before a resume, from the log
            logged = read_csv_log(out_dir / STEP_LOG).items()
            self.curves = {tag: _Curve.of(*curve) for tag, curve in logged if _shown(tag)}
        self._drawn = time.monotonic()

    @classmethod
    def open(
        cls,
        out_dir: Path | None,
        tensorboard: str | os.PathLike | None,
        step: int,
        rank: int = 0,
    ) -> RunLog | None:
        """The log of a run that continues at optimiser step ``step`` (0: a new run);
        what an earlier process logged from that step on is dropped, as it will be logged
        again.  ``None`` on the ranks other than 0, and with nothing to log to.

        Raises
        ------
        dwp.extras.MissingExtraError
            ``tensorboard`` given, and TensorBoard is not installed.
        dwp.train_log.LogFolderError
            ``tensorboard`` cannot be written.
        """
        if tensorboard is not None:
            # on every rank: one rank failing alone would leave the others waiting in DDP
            check_tensorboard(tensorboard, needed_by="TrainConfig.tensorboard")
        if rank != 0 or (out_dir is None and tensorboard is None):
            return None
        loggers = MultiLogger()
        try:
            if tensorboard is not None:
                needed_by = "TrainConfig.tensorboard"
                loggers.add(TensorBoardLogger(tensorboard, purge_step=step, needed_by=needed_by))
            if out_dir is not None:
                loggers.add(CSVLogger(out_dir / STEP_LOG, purge_step=step))
                if step == 0:  # a new run: the old run's curves must not pass for its own
                    (out_dir / CURVES).unlink(missing_ok=True)
            return cls(loggers, out_dir)
        except BaseException:
            loggers.close()  # e.g. TensorBoard's writer thread, when the CSV log is refused
            raise

    def step(
        self,
        step: int,
        terms: Mapping[str, float],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        """Log optimiser step ``step`` (0-based): its loss ``terms``, the learning rates
        and the posterior scales the step computed its loss with."""
        scalars = step_scalars(terms, model, optimizer)
        self.logger.log_scalars(step, scalars)
        if self.out_dir is not None:
            for tag in filter(_shown, scalars):
                curve = self.curves.setdefault(tag, _Curve.of())
                curve.steps.append(step)
                curve.values.append(scalars[tag])

    def epoch(
        self, record: Mapping[str, Any], history: Sequence[Mapping[str, Any]], finished: bool
    ) -> None:
        """After an epoch (``record``, the last of ``history``) and its files: its
        validation metrics, a flush, and the curves when due or when the run is over."""
        # the epoch's last step: a resume from this epoch's last.pt purges from the next one
        step = record["step"] - 1
        val = {f"val/{k[4:]}": v for k, v in record.items() if k.startswith("val_")}
        if val:
            self.logger.log_scalars(step, val)
        self.logger.flush()
        self.draw(history, force=finished)

    def draw(self, history: Sequence[Mapping[str, Any]], *, force: bool = False) -> None:
        """Redraw :data:`CURVES` if :data:`CURVES_EVERY_S` have passed (or ``force``)."""
        if self.out_dir is None or not (force or time.monotonic() - self._drawn >= CURVES_EVERY_S):
            return
        plot_curves(self.out_dir / CURVES, **curve_panels(history, self.curves))
        self._drawn = time.monotonic()

    def close(self) -> None:
        self.logger.close()


def curve_panels(
    history: Sequence[Mapping[str, Any]], steps: Mapping[str, Series] | None = None
) -> dict[str, Any]:
    """The keyword arguments of :func:`dwp.train_log.plot_curves` for a run: its panels
    from the epoch records ``history`` and the per-step curves ``steps`` (tag ->
    ``(steps, values)``, as :func:`dwp.train_log.read_csv_log` reads :data:`STEP_LOG`).

    Epoch records are placed at their epoch's last step, as in TensorBoard.
    """
    steps = steps or {}

    def epochs(key: str) -> Series:
        pairs = [(r["step"] - 1, r[key]) for r in history if r.get(key) is not None]
        return [x for x, _ in pairs], [y for _, y in pairs]

    def per_step(tag: str, key: str) -> Series:  # the step log where there is one
        return steps[tag] if tag in steps else epochs(key)

    rates = {f"group {k[3:]}": v for k, v in steps.items() if k.startswith("lr/")}
    scales = {
        k.removeprefix("posterior_log_sigma/"): v
        for k, v in steps.items()
        if k.startswith("posterior_log_sigma/")
    }
    panels = {
        "training loss": {"per step": steps.get("train/loss", ([], [])),
                          "epoch mean": epochs("train_loss")},
        "validation": {"loss": epochs("val_loss"), "foreground Dice": epochs("val_dice")},
        "ELBO terms": {"data term": per_step("train/data_term", "train_data_term"),
                       "KL": per_step("train/kl", "train_kl")},
        "KL weight (beta)": {"beta": per_step("train/beta", "train_beta")},
        "learning rate": rates or {"group 0": epochs("lr")},
        "mean posterior log sigma": scales,
    }  # fmt: skip
    return {"panels": panels, "log_y": ("training loss", "ELBO terms", "learning rate")}

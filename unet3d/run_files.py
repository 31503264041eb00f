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
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dwp.io import write_json, write_text

__all__ = [
    "RUN_FILES",
    "RunFolderError",
    "clear_run_files",
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

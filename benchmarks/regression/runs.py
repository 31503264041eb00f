"""The benchmark's runs and where they go.

Every network the benchmark trains belongs to one *run*: a BagNet receptive field, the
source prior, one Hydranet method x training size x repetition, the noise model.  A run is
a small picklable spec (:class:`Run`: settings and paths, no data) that rebuilds its
cohorts from the seed, trains, and writes its result into the work folder: ``<stem>.json``
(rows, metrics; written last, atomically: the run's finished mark) and, where it has
tensors, ``<stem>.pt`` before it.  A finished run is never redone, so a rerun resumes.

The runs go in two waves, the second reading the first's files (the prior, the best age
BagNet): through :class:`Runner`, in this process (``--jobs 1``), in worker processes or as
submitit jobs (:mod:`benchmarks.grid`).  Every run seeds itself, so its numbers depend on
its settings and its torch thread count only, not on where or when it ran.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dwp.io import load_torch_file, save_torch_file, write_json

from ..grid import Engine, Failure, GridError, Submitter
from ..stages import logger, stage_folder
from ..workers import spawn_pool
from .config import Preset

__all__ = ["VERSION", "Run", "RunJob", "Runner", "log", "work_folder"]

#: the code version of every run's result, part of the work folder's key: bumped when a
#: change of code changes a result, so that files of older code are never reused
VERSION = 1

log = logger("regression")


def work_folder(work: Path, preset: Preset, seed: int, amp: str = "off") -> Path:
    """``work/regression-<hash>``: the runs of this preset, seed and mixed precision
    ``amp`` (``--amp``; created, with its key in ``config.json``); another preset, seed or
    precision gets another folder.

    ``amp`` changes every network's numbers, so it is in the key, but only when not
    ``"off"``: the float32 key is the one from before the option, and its runs are read
    back.  The device is in no key (:attr:`Run.device`)."""
    key = {"benchmark": "regression", "version": VERSION, "seed": seed, **asdict(preset)}
    if amp != "off":
        key["amp"] = amp
    return stage_folder(work, "regression", key)


@dataclass(frozen=True, kw_only=True)
class Run(ABC):
    """One run: its work ``folder``, the ``preset`` and ``seed`` its cohorts and networks
    derive from, and the TensorBoard root its fits log into (no part of its result).

    Subclasses name the run (:meth:`stem`) and do it (:meth:`compute`), which ends with
    :meth:`finish`."""

    folder: Path
    preset: Preset
    seed: int
    tensorboard: Path | None = None
    #: where its networks train (``--device``); no part of its name or result either: a
    #: finished run is read back whichever device a rerun asks for
    device: str = "cpu"
    #: the networks' mixed precision (``--amp``, :mod:`dwp.amp`); it changes the result, so
    #: it is in the key of the run's :func:`work_folder`, not in its name
    amp: str = "off"

    @abstractmethod
    def stem(self) -> str:
        """The run's file name stem in its folder."""

    @abstractmethod
    def compute(self) -> None:
        """Do the run; ends with :meth:`finish`."""

    @property
    def result(self) -> Path:
        """The run's JSON result, its finished mark."""
        return self.folder / f"{self.stem()}.json"

    @property
    def tensors(self) -> Path:
        """The run's tensors (maps, a network, a prior), written before :attr:`result`."""
        return self.folder / f"{self.stem()}.pt"

    def finished(self) -> bool:
        return self.result.exists()

    def record(self) -> dict[str, Any]:
        """The finished run's record."""
        return json.loads(self.result.read_text())

    def load_tensors(self) -> Any:
        return load_torch_file(self.tensors, what=f"{self.stem()} result")

    def name(self) -> str:
        """The run and its result file, for logs and failures."""
        return f"{self.stem()} ({self.result})"

    def finish(self, record: dict[str, Any], tensors: Any = None, *, started: float) -> None:
        """Write ``tensors`` (if any), then ``record`` with the run's seconds and threads."""
        if tensors is not None:
            save_torch_file(tensors, self.tensors)
        seconds = time.perf_counter() - started
        write_json(self.result, {**record, "seconds": seconds, "threads": torch.get_num_threads()})


@dataclass(frozen=True)
class RunJob:
    """A run with ``threads`` torch threads: what a worker process or a submitit job calls
    (a run's numbers depend on its thread count)."""

    threads: int

    def __call__(self, run: Run) -> str:
        """Compute ``run``; returns its :meth:`~Run.stem` (for the log)."""
        torch.set_num_threads(self.threads)
        run.compute()
        return run.stem()


class Runner:
    """Runs the unfinished runs of a wave: in this process (the processes engine with
    ``jobs=1``, as the benchmark always ran), in ``jobs`` worker processes, or as submitit
    jobs, ``jobs`` at a time (``None``: all; on SLURM the array's parallelism).

    Each run gets :meth:`Engine.threads_per_run` torch threads.  Here the first error
    stops the command; submitit jobs that fail stop no other, and :meth:`check` raises
    :class:`~benchmarks.grid.GridError` naming them with their logs.
    """

    def __init__(self, engine: Engine, work: Path, jobs: int | None, threads: int) -> None:
        self.engine, self.jobs = engine, jobs
        self.job = RunJob(engine.threads_per_run(threads, jobs or 1))
        self.logs = Path(work) / "submitit"
        self.submitter: Submitter | None = None
        if engine.submitit:  # bad options fail now, before any run
            self.submitter = engine.start(self.logs, "dwp-regression")
        self.failures: list[Failure] = []
        self.submitted = 0

    def wave(self, runs: Sequence[Run]) -> None:
        """Run those of ``runs`` that have not finished."""
        todo = [r for r in runs if not r.finished()]
        if not todo:
            return
        self.submitted += len(todo)
        where = self.engine.describe() + (
            "" if self.submitter is None else f", logs in {self.logs}"
        )
        log(f"{len(todo)} of {len(runs)} runs to do ({where})")
        if self.submitter is not None:

            def done(i: int, failure: Failure | None) -> None:
                log(f"failed: {failure}" if failure else f"finished {todo[i].stem()}")

            names = [r.name() for r in todo]
            self.failures += self.submitter.map(self.job, todo, names, at_once=self.jobs, done=done)
        elif (self.jobs or 1) == 1:
            for run in todo:
                self.job(run)
        else:
            # leaving the block terminates the workers (benchmarks.workers): after an
            # error, Ctrl-C or SIGTERM no worker outlives the command, and the runs in
            # progress are redone by a rerun
            with spawn_pool(self.jobs) as pool:
                for stem in pool.imap_unordered(self.job, todo):  # as they finish
                    log(f"finished {stem}")

    def check(self) -> None:
        """Raise :class:`~benchmarks.grid.GridError` if any job failed."""
        if self.failures:
            raise GridError(self.failures, self.submitted)

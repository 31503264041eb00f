"""Running the pipeline: the stages the selected cells need, then the cells, in worker
processes (:class:`CellRunner`) or as submitit jobs (:mod:`benchmarks.grid`: a SLURM job
array per wave, the tuning cells then the grid's); or merging finished cells of several
work folders."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..grid import Engine, Failure, GridError, Submitter
from ..stages import Stage, stage_folder
from ..workers import spawn_pool
from . import artefact
from .cells import Cell, Datasets, grid, run_cell, selected
from .config import LR_FROM, PRIOR, SOURCE, Preset, log
from .data import Data, data_key, prepare_data
from .keys import stage_key, strategy_options
from .prior import PRIOR_STAGE, fit_prior
from .selection import candidates, choose_all, phases, tuning_cell
from .sources import SOURCE_STAGE, train_sources


@dataclass
class Plan:
    """What :func:`run` did: the settings, the stage summaries and every cell's record."""

    preset: Preset
    seed: int
    data_key: dict[str, Any]
    sources: dict[str, Any] | None
    prior: dict[str, Any] | None
    records: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float | None = None
    subjects: dict[str, list[str]] | None = None
    selections: list[dict[str, Any]] = field(default_factory=list)
    execution: dict[str, Any] | None = None


@dataclass(frozen=True)
class Task:
    """One cell to run with its settings: what a worker process needs besides the data."""

    cell: Cell
    preset: Preset
    folder: Path
    options: dict[str, Any]
    seed: int
    tensorboard: Path | None = None  # the run's TensorBoard folder; no part of its result
    evaluate: bool = True  # False: a tuning candidate, trained and validated only

    def finished(self) -> bool:
        if (self.folder / "result.json").exists():
            return True
        return not self.evaluate and (self.folder / "training.json").exists()

    def record(self) -> dict[str, Any]:
        """The finished cell's record (a tuning candidate's: its training summary, unless
        its cell was scored too)."""
        result = self.folder / "result.json"
        return json.loads(
            (result if result.exists() else self.folder / "training.json").read_text()
        )

    def name(self) -> str:
        """The cell and its folder (the tuning candidates of one cell differ by folder)."""
        c = self.cell
        return f"{c.method} n={c.size} split={c.split} ({self.folder})"


_WORKER: tuple[Data, Datasets] | None = None


def _init_worker(preset: Preset, data: Data, threads: int) -> None:
    global _WORKER
    torch.set_num_threads(threads)
    _WORKER = (data, Datasets(preset, data))


def _run_numbered(item: tuple[int, Task]) -> tuple[int, dict[str, Any]]:
    return item[0], _run_task(item[1])


def _run_task(task: Task, worker: tuple[Data, Datasets] | None = None) -> dict[str, Any]:
    worker = worker or _WORKER
    assert worker is not None, "worker not initialised"
    data, datasets = worker
    return run_cell(
        task.cell, task.preset, data, datasets, task.folder, task.options, task.seed,
        tensorboard=task.tensorboard, evaluate=task.evaluate,
    )  # fmt: skip


@dataclass(frozen=True)
class CellJob:
    """One cell as a submitit job.  Only paths and settings travel (a :class:`Data` lists
    files, a :class:`Task` names its folder): the job's process rebuilds the datasets from
    the cached data stage and writes the cell's ``result.json`` as a serial run would."""

    data: Data
    threads: int

    def __call__(self, task: Task) -> None:
        torch.set_num_threads(self.threads)  # a cell's numbers depend on its thread count
        _run_task(task, (self.data, Datasets(task.preset, self.data)))


def _stage_job(threads: int, fn: Callable[..., Any], *args: Any) -> Any:
    """A stage (source nets, prior) as a submitit job, with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    return fn(*args)


class CellRunner:
    """Runs cells in this process (``jobs=1``) or in ``jobs`` worker processes.

    Every run seeds itself, so a cell's numbers depend on its settings and on the torch
    thread count of the process that runs it (``threads`` each), not on which worker runs
    it or when.  On a 2-core CPU two 1-thread runs at a time train 1.4x faster than one
    2-thread run (small 3D convolutions use a second thread poorly).
    """

    def __init__(self, preset: Preset, data: Data, jobs: int = 1, threads: int = 1) -> None:
        self.pool = None
        if jobs > 1:  # spawned (benchmarks.workers): the source nets and VAEs ran OpenMP
            self.pool = spawn_pool(jobs, _init_worker, (preset, data, threads))
        else:
            torch.set_num_threads(threads)
            self.local = (data, Datasets(preset, data))

    def run(
        self, tasks: Sequence[Task], done: Callable[[Task], None] | None = None
    ) -> list[dict[str, Any]]:
        """The records of ``tasks`` in their order; ``done(task)`` after each one."""
        records: list[dict[str, Any] | None] = [None] * len(tasks)
        if self.pool is None:
            for i, t in enumerate(tasks):
                records[i] = _run_task(t, self.local)
                if done:
                    done(t)
            return records  # type: ignore[return-value]
        try:
            for i, record in self.pool.imap_unordered(_run_numbered, enumerate(tasks)):
                records[i] = record
                if done:
                    done(tasks[i])
        except BaseException:  # an error, Ctrl-C or SIGTERM: the runs in progress stop too
            self.pool.terminate()
            self.pool = None
            raise
        return records  # type: ignore[return-value]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def default_jobs() -> int:
    """Cells run at a time by default: the CPU count, at most 2 (see :class:`CellRunner`)."""
    return max(1, min(2, os.cpu_count() or 1))


def run(
    preset: Preset,
    work: Path,
    seed: int = 0,
    *,
    only: Mapping[str, set[str]] | None = None,
    source_data: Path | None = None,
    target_data: Path | None = None,
    progress: bool = True,
    jobs: int | None = 1,
    threads: int | None = None,
    engine: Engine | None = None,
    tensorboard: Path | None = None,
) -> Plan:
    """Run the stages the selected cells need, then the cells (cached ones are read back).

    The source nets and the prior use ``threads`` torch threads (default: torch's
    current count); the cells run ``jobs`` at a time with ``threads // jobs`` each.

    ``engine`` (default: worker processes here, :class:`CellRunner`): with submitit, the
    source and prior stages (when not cached) and every unfinished cell run as jobs, the
    tuning cells first, in the phases of :func:`~.selection.phases` (fine-tuning's
    learning rate before the methods that share it), and the grid's once the settings are
    chosen; on SLURM ``jobs`` caps the array's parallelism (``None``: no cap) and a run
    uses its job's CPUs.  Failed jobs raise :class:`~benchmarks.grid.GridError` once
    every other job has finished (a method whose tuning failed, or whose learning rate's
    lender failed, runs no grid cell: its settings cannot be chosen).

    ``tensorboard``: every cell trained logs TensorBoard events into
    ``tensorboard/<method>-<hash>/n<size>/split<split>``, its run folder's path under
    ``work/runs`` (tuning candidates differ by hash).  Logging is no part of a stage key.
    """
    started = time.perf_counter()
    engine = engine or Engine()
    threads = threads or torch.get_num_threads()
    if (jobs is not None and jobs < 1) or threads < 1:
        raise ValueError(f"jobs and threads must be >= 1, got {jobs} and {threads}")
    if jobs is None and not engine.remote:
        jobs = 1
    per_run = engine.threads_per_run(threads, jobs or 1)
    submitter: Submitter | None = None
    if engine.submitit:
        work = Path(work).absolute()  # the jobs may start elsewhere on the shared disk
        submitter = engine.start(work / "submitit", "dwp-transfer")  # bad options: fail now
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cells = [c for c in grid(preset) if selected(c, only or {})]
    if not cells:
        raise ValueError(f"--only {only} selects no cell of the grid")
    methods = {c.method for c in cells}
    # the cohorts generate a subject per thread given (the same files whatever the count)
    data = prepare_data(preset, work, seed, source_data, target_data, progress, jobs=threads)

    def stage(cache: Stage, key: dict[str, Any], fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` here, or as one job when the stage is not cached yet."""
        if submitter is None:
            return fn(*args)
        cached = cache.find([work], key)
        if cached is not None:
            return cached  # no job (and no queue wait) for a finished stage
        log(f"{cache.name} stage: one job ({engine.describe()})")
        per_job = engine.threads_per_run(threads, 1)
        return submitter.call(_stage_job, per_job, fn, *args, name=f"{cache.name} stage")

    sources = prior = None
    # The learned priors need the source kernels whatever their initialisation; N(0, 1)
    # needs the source only to start there.
    needs_prior = bool(methods & {"dwp", "kernel_gaussian", "swag"})
    needs_source = needs_prior or any(
        "source" in strategy_options(preset.replace(**option), method)
        for method in methods
        for option in [{}, *candidates(preset, method)]
    )
    # A committed artefact (benchmarks/artefacts) stands in for both stages when this
    # work folder has not got them: verified against its checksums before use.
    keys = {s: stage_key(preset, s, seed, data.key) for s in (SOURCE, PRIOR)}
    show = progress and submitter is None  # a job's log is no place for a progress bar
    committed = None
    if needs_source and source_data is None:
        if SOURCE_STAGE.find([work], keys[SOURCE]) is None or (
            needs_prior and PRIOR_STAGE.find([work], keys[PRIOR]) is None
        ):
            committed = artefact.locate(preset, seed, data.key)
    if committed is not None:
        log(f"source nets and priors from the committed artefact {committed}")
        sources = SOURCE_STAGE.find([committed], keys[SOURCE])
        prior = PRIOR_STAGE.find([committed], keys[PRIOR])
    elif needs_source:
        sources = stage(SOURCE_STAGE, keys[SOURCE], train_sources, preset, data, work, seed, show)
    if needs_prior and committed is None:
        prior = stage(
            PRIOR_STAGE, keys[PRIOR], fit_prior, preset, data.key, sources, work, seed, show
        )

    def task(candidate: Preset, cell: Cell, evaluate: bool = True) -> Task:
        key = stage_key(candidate, cell.method, seed, data.key)
        folder = stage_folder(work / "runs", cell.method, key)
        options = strategy_options(candidate, cell.method, sources, prior)
        # TensorBoard: the run folder's path under work/runs (None: no logging)
        events = tensorboard and Path(tensorboard).absolute() / folder.name / cell.folder()
        return Task(cell, candidate, folder / cell.folder(), options, seed, events, evaluate)

    def tuning_tasks(candidate: Preset, tuned: set[str]) -> list[Task]:
        # trained and validated only: the test set scores the chosen one, as a grid cell
        return [
            task(candidate.replace(**option), tuning_cell(candidate, method), evaluate=False)
            for method in sorted(tuned)
            for option in candidates(candidate, method)
        ]

    # Settings are chosen in phases: the priors and L2-SP train at the learning rate
    # chosen for fine-tuning, so their candidates run once it is chosen.
    waves = phases(preset, methods)
    tuning = [t for wave in waves for t in tuning_tasks(preset, wave)]
    # An upper bound until the settings are chosen (a chosen tuning run is a grid cell).
    total = len(tuning) + sum(c != tuning_cell(preset, c.method) for c in cells)
    bar = tqdm(total=total, desc="transfer runs", disable=not progress)

    def advance(t: Task) -> None:
        bar.set_postfix_str(f"{t.cell.method} n={t.cell.size} split={t.cell.split}")
        bar.update()

    def score(candidate: Preset, method: str) -> float:
        # The folder hash holds this method's settings only, so the other method's
        # choice (already in ``candidate``) does not move it.
        return task(candidate, tuning_cell(candidate, method), False).record()["val_dice"]

    runner = None if submitter else CellRunner(preset, data, jobs or 1, per_run)
    failures: list[Failure] = []
    submitted = 0

    def run_wave(tasks: list[Task]) -> set[str]:
        """Run the unfinished ``tasks``; the methods of those that failed."""
        nonlocal submitted
        todo = [t for t in tasks if not t.finished()]
        if runner is not None:
            runner.run(todo, advance)  # fails fast: the first error stops the pool
            return set()
        assert submitter is not None  # one engine or the other
        failed: set[str] = set()

        def finished(i: int, failure: Failure | None) -> None:
            advance(todo[i])
            if failure is not None:
                failed.add(todo[i].cell.method)
                failures.append(failure)
                log(f"failed: {failure}")

        if todo:
            log(f"{len(todo)} cell job(s) on {engine.describe()}, logs in {work / 'submitit'}")
        submitted += len(todo)
        names = [t.name() for t in todo]
        submitter.map(CellJob(data, per_run), todo, names, at_once=jobs, done=finished)
        return failed

    try:
        selections: list[dict[str, Any]] = []
        failed: set[str] = set()
        for wave in waves:
            # a method whose lender failed cannot run: its learning rate is not chosen
            wave = {m for m in wave if LR_FROM.get(m) not in failed}
            tasks = tuning_tasks(preset, wave)
            bar.update(sum(t.finished() for t in tasks))
            failed |= run_wave(tasks)
            preset, chosen = choose_all(preset, wave - failed, score)
            selections += chosen
        for selection in selections:
            log(f"{selection['method']}: {selection['chosen']} chosen on validation Dice")
        tasks = [task(preset, c) for c in cells if c.method in methods - failed]
        bar.total = bar.n + sum(not t.finished() for t in tasks)
        bar.refresh()
        run_wave(tasks)
    finally:
        if runner is not None:
            runner.close()
        bar.close()
    if failures:
        raise GridError(failures, submitted)
    records = [t.record() for t in tasks]
    roles = {"pool": data.pool, "val": data.val, "test": data.test}
    subjects = {role: [c.id for c in cases] for role, cases in roles.items()}
    plan = Plan(preset, seed, data.key, sources, prior, records, subjects=subjects)
    plan.selections = selections
    plan.wall_seconds = time.perf_counter() - started
    plan.execution = {
        "engine": engine.describe(),
        "jobs": jobs,
        "threads": threads,
        "threads_per_run": per_run,
    }
    return plan


def run_regimes(preset: Preset, work: Path, seed: int = 0, **options: Any) -> dict[str, Plan]:
    """:func:`run` for each of ``preset.regimes`` in turn, by regime.  The source nets and
    the priors are computed once: no regime is in their keys."""
    return {r: run(preset.replace(regime=r), work, seed, **options) for r in preset.regimes}


def merge_regimes(
    preset: Preset, work_dirs: Sequence[Path], seed: int = 0, **options: Any
) -> dict[str, Plan]:
    """:func:`merge` for each of ``preset.regimes``, by regime."""
    return {r: merge(preset.replace(regime=r), work_dirs, seed, **options) for r in preset.regimes}


def merge(
    preset: Preset,
    work_dirs: Sequence[Path],
    seed: int = 0,
    *,
    source_data: Path | None = None,
    target_data: Path | None = None,
) -> Plan:
    """Finished cells of this configuration from several work folders (e.g. one per
    machine), for one report; nothing is trained.

    Run folders of other configurations are ignored (their hash differs); a cell found in
    two folders must agree.  Source and prior summaries come from the first folder that
    has them.
    """
    data = data_key(preset, seed, source_data, target_data)
    work_dirs = [Path(w) for w in work_dirs]
    for work in work_dirs:
        if not work.is_dir():
            raise FileNotFoundError(f"--merge: {work} is not a folder")

    def records(candidate: Preset, method: str) -> dict[tuple, dict[str, Any]]:
        key = stage_key(candidate, method, seed, data)
        found: dict[tuple, dict[str, Any]] = {}
        for work in work_dirs:
            folder = stage_folder(work / "runs", method, key, create=False)
            for path in sorted(folder.glob("n*/split*/result.json")):
                record = json.loads(path.read_text())
                cell = (record["method"], record["size"], record["split"])
                if cell in found and not math.isclose(found[cell]["dice"], record["dice"]):
                    raise ValueError(f"{path}: disagrees with another copy of cell {cell}")
                found[cell] = record
        return found

    def score(candidate: Preset, method: str) -> float | None:
        """The tuning candidate's validation Dice, from its cell's record or, when that
        cell was not scored (a candidate not chosen), its training summary."""
        cell = tuning_cell(candidate, method)
        record = records(candidate, method).get((method, cell.size, cell.split))
        if record is not None:
            return record["val_dice"]
        key = stage_key(candidate, method, seed, data)
        for work in work_dirs:
            folder = stage_folder(work / "runs", method, key, create=False)
            summary = folder / cell.folder() / "training.json"
            if summary.exists():
                return json.loads(summary.read_text())["val_dice"]
        return None

    roots = list(work_dirs)
    if source_data is None:  # the committed artefact of this configuration, if any
        committed = artefact.locate(preset, seed, data)
        roots += [committed] if committed is not None else []
    sources = SOURCE_STAGE.find(roots, stage_key(preset, SOURCE, seed, data))
    prior = PRIOR_STAGE.find(roots, stage_key(preset, PRIOR, seed, data))
    preset, selections = choose_all(preset, preset.methods, score)
    found = {k: v for method in preset.methods for k, v in records(preset, method).items()}
    wanted = {(c.method, c.size, c.split) for c in grid(preset)}
    rows = [found[k] for k in sorted(found) if k in wanted]
    if len(rows) < len(wanted):
        log(f"{len(wanted) - len(rows)} of {len(wanted)} cells have no result yet")
    return Plan(preset, seed, data, sources, prior, rows, selections=selections)

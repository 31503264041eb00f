"""Where a benchmark's independent runs go: worker processes on this machine, or submitit
jobs (SLURM job arrays; submitit's local executor on a laptop and in tests).

A benchmark that caches one result file per run hands :meth:`Submitter.map` the runs not
finished yet; each becomes one job that rebuilds what it needs from files and writes its
result exactly as a serial run would, so a rerun skips what is done and resumes the rest.
The engine only launches jobs and reports the ones that failed (:class:`GridError`, with
each run's name and its log); it never reads results::

    engine = engine_from_args(args)               # --engine, --cluster, --slurm-*, ...
    submitter = engine.start(work / "submitit", "dwp-transfer")
    failures = submitter.map(run_one, todo, names=[t.name() for t in todo], at_once=2)

Why submitit and not Ray: the runs are independent (no shared state, no task graph within
a wave), SLURM job arrays are what clusters schedule best, the local executor needs no
server, and the results stay one file per run on the shared disk, readable by anything.
"""

from __future__ import annotations

import argparse
import ast
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "CLUSTERS",
    "ENGINES",
    "Engine",
    "Failure",
    "GridError",
    "Requeueable",
    "Submitter",
    "add_engine_arguments",
    "engine_from_args",
    "require_submitit",
]

ENGINES = ("processes", "submitit")
#: submitit's executors: ``local`` (processes here), ``slurm`` (job arrays), ``debug`` (in
#: this process, pdb on a failure)
CLUSTERS = ("local", "slurm", "debug")
#: submitit's SLURM default time limit is 5 minutes, which no real run fits; a day is
#: within most partitions' limits (``--slurm-time`` otherwise).
DEFAULT_SLURM_MINUTES = 24 * 60
#: the local executor's default (2 minutes) would kill every real run; a week is "never".
LOCAL_MINUTES = 7 * 24 * 60
#: --slurm-* option -> submitit parameter (``slurm_`` ones are ignored by other clusters)
SLURM_OPTIONS = {
    "partition": "slurm_partition",
    "time": "slurm_timeout_min",
    "gpus": "slurm_gpus_per_node",
    "cpus": "slurm_cpus_per_task",
    "mem": "slurm_mem_gb",
}


def require_submitit() -> ModuleType:
    """The ``submitit`` module; without it, :class:`~dwp.extras.MissingExtraError` (an
    ``ImportError``) whose one line names the fix, ``pip install "dwp[grid]"``."""
    # imported here, not with the module: every job imports this module (its
    # Requeueable) first, and importing dwp means importing torch (2 s)
    from dwp.extras import require

    require("submitit", extra="grid", needed_by="--engine submitit")
    import submitit

    return submitit


@dataclass(frozen=True)
class Failure:
    """A run whose job failed: its ``name``, the error's last line and the job's log."""

    name: str
    error: str
    log: Path | None

    def __str__(self) -> str:
        return f"{self.name}: {self.error} (log: {self.log})"


class GridError(RuntimeError):
    """Runs failed (every other run was finished first); ``failures`` says which."""

    def __init__(self, failures: Sequence[Failure], total: int) -> None:
        self.failures = list(failures)
        lines = "\n".join(f"  {f}" for f in self.failures)
        super().__init__(f"{len(self.failures)} of {total} runs failed:\n{lines}")


class Requeueable:
    """``fn`` as a job SLURM may requeue when it times out or is preempted (submitit calls
    :meth:`checkpoint` then): safe for runs that resume from their own files, since the
    requeued job simply calls ``fn`` again with the same arguments."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def checkpoint(self, *args: Any) -> Any:
        submitit = require_submitit()  # only ever called inside a submitit job
        return submitit.helpers.DelayedSubmission(self, *args)


@dataclass(frozen=True)
class Engine:
    """Where runs go: ``kind`` ``"processes"`` (the benchmark's own worker pool) or
    ``"submitit"`` on ``cluster``, with submitit ``parameters`` (AutoExecutor names:
    ``slurm_partition``, ``slurm_timeout_min``, ``local_timeout_min``, ...)."""

    kind: str = "processes"
    cluster: str = "local"
    parameters: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ENGINES:
            raise ValueError(f"--engine {self.kind!r}: choose from {list(ENGINES)}")
        if self.cluster not in CLUSTERS:
            raise ValueError(f"--cluster {self.cluster!r}: choose from {list(CLUSTERS)}")

    @property
    def submitit(self) -> bool:
        return self.kind == "submitit"

    @property
    def remote(self) -> bool:
        """Whether runs go to other machines (SLURM), which bring their own CPUs."""
        return self.submitit and self.cluster == "slurm"

    def threads_per_run(self, threads: int, jobs: int) -> int:
        """Torch threads of one run.

        Parameters
        ----------
        threads
            Torch threads of this machine that the runs share.
        jobs
            Runs at a time on this machine.

        Returns
        -------
        int
            On SLURM, the job's CPUs (``slurm_cpus_per_task``, default 1: a job gets no
            more from the scheduler); here, the run's share ``threads // jobs`` (at least 1).
        """
        if self.remote:
            return int(self.parameters.get("slurm_cpus_per_task", 1))
        return max(1, threads // jobs)

    def describe(self) -> str:
        """``"processes"``, or ``"submitit/<cluster>"``: for logs and result files."""
        return f"submitit/{self.cluster}" if self.submitit else self.kind

    def start(self, folder: Path, name: str) -> Submitter:
        """Open a submitit executor, checking the parameters before any job is due.

        Parameters
        ----------
        folder
            Where the jobs keep their pickles and logs, one folder per job:
            ``folder/<job id>/<job id>_0_log.err``.
        name
            The jobs' name (SLURM's ``--job-name``).

        Returns
        -------
        Submitter
            Ready to :meth:`~Submitter.map` or :meth:`~Submitter.call`.

        Raises
        ------
        ValueError
            For the processes engine, a parameter submitit does not know, or
            ``cluster="slurm"`` on a machine without SLURM.
        ImportError
            Without submitit (one line naming ``pip install "dwp[grid]"``).
        """
        if not self.submitit:
            raise ValueError("the processes engine submits no job")
        submitit = require_submitit()
        parameters = {"name": name, "local_timeout_min": LOCAL_MINUTES, **self.parameters}
        try:
            executor = submitit.AutoExecutor(Path(folder) / "%j", cluster=self.cluster)
            executor.update_parameters(**parameters)
        except (NameError, AssertionError, TypeError, RuntimeError) as error:
            # submitit says these in several lines (every valid name); the first is the fault
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise ValueError(f"submitit ({self.cluster}): {first}") from error
        return Submitter(executor, self)


def _summary(error: BaseException) -> str:
    """The line of a job's error worth printing: the exception line of its traceback
    (submitit's ``FailedJobError`` puts the traceback between two rules of 22 dashes),
    else the error's first two lines (a job killed, timed out or never started)."""
    text = str(error).strip()
    parts = text.split("-" * 22)
    lines = [line.strip() for line in (parts[1] if len(parts) >= 3 else text).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(error).__name__
    return lines[-1] if len(parts) >= 3 else " ".join(lines[:2])


class Submitter:
    """A started submitit executor: :meth:`map` runs many items, :meth:`call` one."""

    def __init__(self, executor: Any, engine: Engine) -> None:
        self.executor = executor
        self.engine = engine
        # SLURM's queue is asked at most once a minute anyway (submitit's watcher); the
        # result files of local jobs are cheap to look for.
        self.poll_seconds = 15.0 if engine.cluster == "slurm" else 0.5

    @staticmethod
    def _poll(job: Any) -> tuple[bool, BaseException | None]:
        """Whether ``job`` has ended, and the error its ``done()`` raised: the debug
        executor runs the job inside ``done()`` and raises its error there (asking
        ``exception()`` afterwards would run the job a second time)."""
        try:
            return bool(job.done()), None
        except Exception as error:
            return True, error

    @staticmethod
    def _failure(job: Any, name: str, error: BaseException | None) -> Failure | None:
        error = error or job.exception()
        if error is None:
            return None
        log = getattr(getattr(job, "paths", None), "stderr", None)
        return Failure(name, _summary(error), log)

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        names: Sequence[str],
        *,
        at_once: int | None = None,
        done: Callable[[int, Failure | None], None] | None = None,
    ) -> list[Failure]:
        """Run ``fn(item)`` for every item, one job each, and wait for all of them.

        A failed job stops no other; an interrupt (Ctrl-C) cancels the jobs still queued
        or running.

        Parameters
        ----------
        fn
            A picklable callable (a module-level function, or an instance of a
            module-level class): the job imports it by name.  It should take paths and
            settings, not data, and write its own result file.
        items
            ``fn``'s argument for each job.
        names
            Each item's name, for the failures.
        at_once
            Jobs running at a time; ``None``: all.  On SLURM the array's parallelism
            (the wave is one array); here a window that submits the next item when a job
            ends, since the local executor starts at once whatever it is given.
        done
            Called ``done(index, failure)`` after each job (``failure`` ``None`` if it
            succeeded), e.g. for a progress bar.

        Returns
        -------
        list of Failure
            The failed items, each with its job's error line and log file.
        """
        return [f for _, f in self._run(fn, items, names, at_once, done) if f is not None]

    def call(self, fn: Callable[..., Any], *args: Any, name: str) -> Any:
        """``fn(*args)`` as one job (a pipeline stage), waited for.

        Returns
        -------
        Any
            What ``fn`` returned (pickled back: keep it small, a summary of files).

        Raises
        ------
        GridError
            If the job failed, naming it ``name``, with its log.
        """
        ((job, failure),) = self._run(_star, [(fn, args)], [name], 1, None)
        if failure is not None:
            raise GridError([failure], 1)
        return job.result()

    def _run(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        names: Sequence[str],
        at_once: int | None,
        done: Callable[[int, Failure | None], None] | None,
    ) -> list[tuple[Any, Failure | None]]:
        """:meth:`map`'s work: every item's finished job and its failure, in item order."""
        if len(names) != len(items):
            raise ValueError(f"{len(items)} items but {len(names)} names")
        if self.engine.cluster == "slurm":
            if at_once is not None:
                self.executor.update_parameters(slurm_array_parallelism=at_once)
            window = len(items)  # one array; SLURM applies the parallelism
        else:
            window = min(len(items), at_once or len(items))
        fn = Requeueable(fn)
        waiting = list(range(len(items)))
        running: dict[int, Any] = {}
        outcomes: list[tuple[Any, Failure | None]] = [(None, None)] * len(items)
        try:
            while waiting or running:
                free = window - len(running)
                if waiting and free > 0:
                    batch, waiting = waiting[:free], waiting[free:]
                    jobs = self.executor.map_array(fn, [items[i] for i in batch])
                    running.update(zip(batch, jobs, strict=True))
                polled = {i: self._poll(job) for i, job in running.items()}
                finished = [i for i, (ended, _) in polled.items() if ended]
                for i in finished:
                    job = running.pop(i)
                    outcomes[i] = (job, self._failure(job, names[i], polled[i][1]))
                    if done:
                        done(i, outcomes[i][1])
                if not finished:
                    time.sleep(self.poll_seconds)
        except BaseException:
            for job in running.values():
                job.cancel(check=False)
            raise
        return outcomes


def _star(item: tuple[Callable[..., Any], tuple[Any, ...]]) -> Any:
    fn, args = item
    return fn(*args)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options :func:`engine_from_args` reads, as one group of ``parser``.

    Parameters
    ----------
    parser
        A benchmark's parser; gains ``--engine``, ``--cluster``,
        ``--slurm-partition/-time/-gpus/-cpus/-mem`` and ``--executor-option``.
    """
    group = parser.add_argument_group(
        "engine", "where the runs go; --engine submitit is the way to use many machines"
    )
    group.add_argument(
        "--engine",
        choices=ENGINES,
        default="processes",
        help="processes: --jobs worker processes here (default); submitit: one job per run",
    )
    group.add_argument(
        "--cluster",
        choices=CLUSTERS,
        help="submitit's executor: local processes (default), slurm job arrays, or debug "
        "(in this process, pdb on a failure)",
    )
    group.add_argument("--slurm-partition", metavar="NAME")
    group.add_argument(
        "--slurm-time",
        type=int,
        metavar="MINUTES",
        help=f"time limit of one job (default {DEFAULT_SLURM_MINUTES}); a job that reaches "
        "it is requeued and resumes",
    )
    group.add_argument("--slurm-gpus", type=int, metavar="N", help="GPUs per job")
    group.add_argument(
        "--slurm-cpus", type=int, metavar="N", help="CPUs per job, its torch threads (default 1)"
    )
    group.add_argument("--slurm-mem", type=float, metavar="GB", help="memory per job")
    group.add_argument(
        "--executor-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any submitit parameter (repeatable), e.g. slurm_account=abc, slurm_qos=high, "
        "slurm_setup='[\"module load cuda\"]'",
    )


def _value(text: str) -> Any:
    """A Python literal (numbers, lists, dicts), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def engine_from_args(args: argparse.Namespace) -> Engine:
    """The :class:`Engine` that :func:`add_engine_arguments`' options describe.

    Parameters
    ----------
    args
        The parsed options.

    Returns
    -------
    Engine
        ``Engine()`` (processes) by default; with ``--engine submitit``, its cluster
        (default local) and parameters, the SLURM time limit defaulting to
        :data:`DEFAULT_SLURM_MINUTES` (submitit's own default, 5 minutes, fits no run).

    Raises
    ------
    ValueError
        For a malformed ``--executor-option``, or a submitit option without ``--engine
        submitit``.
    ImportError
        With ``--engine submitit`` and no submitit: one line naming the fix, checked here
        so that the command fails before any work.
    """
    slurm = {
        SLURM_OPTIONS[name]: value
        for name in SLURM_OPTIONS
        if (value := getattr(args, f"slurm_{name}")) is not None
    }
    extra = {}
    for item in args.executor_option:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--executor-option {item!r}: expected NAME=VALUE")
        extra[name] = _value(value)
    if args.engine != "submitit":
        if args.cluster or slurm or extra:
            raise ValueError("--cluster, --slurm-* and --executor-option need --engine submitit")
        return Engine()
    require_submitit()
    parameters = {SLURM_OPTIONS["time"]: DEFAULT_SLURM_MINUTES, **slurm, **extra}
    return Engine("submitit", args.cluster or "local", parameters)

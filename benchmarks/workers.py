"""Worker processes that end with the benchmark command that started them.

The benchmarks run their cells in ``spawn`` pools (a forked child of a process that already
ran OpenMP code can deadlock in its first parallel region).  Ctrl-C reaches the whole
process group, so the workers stop with the command; SIGTERM (``kill``, a job scheduler)
reaches the command alone, which would die without terminating its pool and leave the
workers training on, orphaned, for cells nobody waits for.  :func:`terminate_as_exit`
turns SIGTERM into an exception so that the pool's cleanup runs; :func:`spawn_pool`
is the pool whose cleanup terminates its workers rather than waiting for them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Callable, Iterator
from multiprocessing.pool import Pool
from typing import Any

__all__ = ["spawn_pool", "terminate_as_exit"]


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Inside the block, SIGTERM raises ``SystemExit(128 + SIGTERM)`` in the main thread,
    as Ctrl-C raises ``KeyboardInterrupt``, so that ``finally`` blocks and context managers
    run (a :func:`spawn_pool` terminates its workers).  The previous handler is restored;
    outside the main thread (where no handler can be set) the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def spawn_pool(
    processes: int,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Pool:
    """``processes`` spawned workers (``multiprocessing.Pool``), each running
    ``initializer(*initargs)`` first.  Leaving ``with spawn_pool(...)`` (or calling
    ``terminate()``) kills the workers, runs in progress included: their cells are redone
    by a rerun (results are written atomically, so none is half-written)."""
    return multiprocessing.get_context("spawn").Pool(processes, initializer, initargs)

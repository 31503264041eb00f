"""Processes under /proc, for the tests that no benchmark worker outlives its command."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited: only its parent has not read its status)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def pool_workers(pid: int) -> set[int]:
    """Live pool workers (multiprocessing's ``spawn_main``) whose parent is ``pid``."""
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            spawned = b"spawn_main" in (stat.parent / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if parent == pid and spawned and alive(int(stat.parent.name)):
            kids.add(int(stat.parent.name))
    return kids


def assert_sigterm_ends_the_workers(argv: list[str], workers: int = 2, start: float = 120) -> None:
    """Run ``argv``, wait (at most ``start`` s) until it has ``workers`` pool workers, send
    it SIGTERM: it must exit with status 128 + SIGTERM and no worker may outlive it."""
    command = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + start
        while len(pool_workers(command.pid)) < workers and time.monotonic() < deadline:
            time.sleep(0.2)
        started = pool_workers(command.pid)
        assert len(started) == workers, "the pool never started"
        command.send_signal(signal.SIGTERM)
        assert command.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while any(map(alive, started)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(alive, started))  # none outlives the command
    finally:
        command.kill()
        command.wait()

"""The machine under the measurements: glibc's allocator, the load of other processes,
this process's resident memory.

Wall times mean little without knowing what else the machine did, so every section records
how many cores other processes kept busy (:class:`OtherLoad`) and the results call out the
sections that ran on a busy machine (:func:`busy_note`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "BUSY_OTHER_CORES",
    "OtherLoad",
    "busy_note",
    "is_busy",
    "reset_peak_rss",
    "rss_mib",
    "tune_glibc_malloc",
]

# -- the allocator -------------------------------------------------------------------------
#: glibc's mallopt parameter numbers (malloc.h) and the value used for both.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_THRESHOLD = 1 << 30


def tune_glibc_malloc() -> str:
    """Keep freed memory in the process instead of returning it to the OS (glibc only).

    By default glibc serves allocations above a few MiB with fresh ``mmap`` pages and
    returns freed heap tops to the OS, so every training step page-faults its large
    activation tensors back in (measured on the earlier stand-in stack: ~45,000 faults and
    ~0.1 s of system time per step).  Estimators that allocate more temporaries pay more,
    which distorts the ratios.  Raising both thresholds is what the environment variables
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (or jemalloc / tcmalloc, as
    PyTorch's CPU tuning guide recommends) do.  Applied once, before any variant runs, so
    the baselines and every variant share it.

    Returns
    -------
    str
        A description of the allocator setting, for the results' config.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MALLOC_THRESHOLD) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, _MALLOC_THRESHOLD) == 1
    except (OSError, AttributeError, TypeError):
        ok = False
    return "glibc, mmap/trim thresholds 1 GiB" if ok else "system default (mallopt unavailable)"


# -- other processes ----------------------------------------------------------------------
#: Other processes using more than this many cores on average flag a section as disturbed.
BUSY_OTHER_CORES = 0.2


def _busy_cpu_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux ``/proc/stat``), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait
    ticks = [int(v) for v in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    # children too: the unet3d section's inference processes are ours, not "other" load
    # (their times count once they have been waited for, i.e. by the end of the block)
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class OtherLoad:
    """Average number of cores that *other* processes kept busy during a block.

    On a 2-core machine one busy neighbour is enough to stall every 2-thread parallel op
    of ours (measured: a 5-epoch VAE fit took 65 s instead of 6.4 s), so every section
    records this as an objective noise indicator next to its IQRs.
    """

    cores: float | None = None

    @contextlib.contextmanager
    def measure(self) -> Iterator[OtherLoad]:
        """Measure the ``with`` block; ``cores`` is set when it ends (stays ``None``
        without ``/proc/stat``)."""
        busy0, own0, wall0 = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
        try:
            yield self
        finally:
            busy1, own1, wall = _busy_cpu_s(), _own_cpu_s(), time.perf_counter() - wall0
            if busy0 is not None and busy1 is not None and wall > 0:
                self.cores = max(0.0, (busy1 - busy0) - (own1 - own0)) / wall


def is_busy(cores: float | None) -> bool | None:
    """Whether other processes kept more than :data:`BUSY_OTHER_CORES` cores busy.

    The noise flag of a single, unrepeated measurement, which has no IQR to show it;
    ``None`` where the load is unknown.
    """
    return None if cores is None else cores > BUSY_OTHER_CORES


def busy_note(section_loads: dict[str, float | None]) -> list[str]:
    """A warning naming the sections that ran on a busy machine, or no lines at all.

    Parameters
    ----------
    section_loads
        Per section, the cores other processes kept busy on average (``None``: unknown).

    Returns
    -------
    list of str
        One Markdown paragraph, or none when no section was disturbed.
    """
    busy = {s: c for s, c in section_loads.items() if is_busy(c)}
    if not busy:
        return []
    listed = ", ".join(f"{s} {c:.2f}" for s, c in busy.items())
    return [
        f"**Machine busy**: other processes kept on average {listed} cores (of "
        f"{os.cpu_count()}) busy during these sections; a busy neighbour stalls every "
        "multi-threaded op, so their times are inflated (the fit's most: it is a single, "
        "unrepeated measurement). Rerun on an idle machine, or pin --threads 1."
    ]


# -- this process's memory ----------------------------------------------------------------
def rss_mib() -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of this process in MiB, from ``/proc/self/status``."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024  # kB
    return out


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0); ``False`` if not."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False

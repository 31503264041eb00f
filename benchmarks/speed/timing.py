"""The timing harness: a timed unit of work (:class:`Variant`), warm-up and round-robin
interleaved timing with the garbage collector held off, the memory autograd keeps for the
backward pass, and one summary row per variant (quartiles, ratio to a baseline).
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .settings import WARMUP_STEPS

__all__ = [
    "NOISY_IQR_FRACTION",
    "Variant",
    "gc_paused",
    "join_tables",
    "met_cell",
    "noisy_note",
    "phase_cells",
    "quartiles",
    "run_interleaved",
    "saved_for_backward_mib",
    "schedule",
    "seeded_input",
    "summarise",
    "time_once",
    "time_variants",
]

#: An IQR above this fraction of the median flags a variant's timings as noisy.
NOISY_IQR_FRACTION = 0.2


@dataclass
class Variant:
    """One timed unit of work and the measurements taken so far.

    ``forward`` does the first phase and returns a scalar tensor (the loss, or the KL
    bound); ``backward`` consumes it.  Both phases are timed, separately and together;
    ``setup``, when given, runs untimed before each forward.
    """

    section: str
    name: str
    forward: Callable[[], Tensor]
    backward: Callable[[Tensor], None]
    reps: int
    warmup: int = WARMUP_STEPS
    #: Name of the variant whose median this one is divided by (itself for a baseline).
    baseline: str = ""
    target_ratio: float | None = None
    #: Static facts for the results row (network, kernels, parameters...).
    info: dict[str, Any] = field(default_factory=dict)
    setup: Callable[[], None] | None = None
    step_s: list[float] = field(default_factory=list)
    forward_s: list[float] = field(default_factory=list)
    backward_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.baseline = self.baseline or self.name


def seeded_input(seed: int, batch: int, size: int) -> Tensor:
    """A standard normal ``(batch, 1, size, size, size)`` input volume drawn after seeding
    torch with ``seed``, so that every section's input depends on the seed alone."""
    torch.manual_seed(seed)
    return torch.randn(batch, 1, size, size, size)


# -- timing --------------------------------------------------------------------------------
@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect now, then keep the collector off for the duration of the block.

    Garbage left by one variant must not be collected (and billed) while another variant
    is being timed; ``timeit`` disables the collector for the same reason.
    """
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@contextlib.contextmanager
def _gc_frozen() -> Iterator[None]:
    """Exempt every object alive now (torch's modules, the models) from collection.

    The per-step ``gc.collect()`` then scans only the step's own garbage: a full
    collection costs ~0.1 s, more than a whole ``--quick`` step.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def time_once(variant: Variant, record: bool = True) -> None:
    """Run and time ``variant`` once; ``record=False`` runs a warm-up."""
    with gc_paused():
        if variant.setup is not None:
            variant.setup()
        start = time.perf_counter()
        loss = variant.forward()
        mid = time.perf_counter()
        variant.backward(loss)
        end = time.perf_counter()
    variant.losses.append(loss.item())
    if record:
        variant.step_s.append(end - start)
        variant.forward_s.append(mid - start)
        variant.backward_s.append(end - mid)


def schedule(reps: Sequence[int], rounds: int) -> list[list[int]]:
    """Indices of the variants that run in each round, the starting one rotating.

    A variant with ``reps < rounds`` runs in ``reps`` rounds spread evenly over the run
    (centred in equal slices), so that it samples the same drifts as the others.
    """
    runs_in: list[set[int]] = [
        {min(rounds - 1, int((i + 0.5) * rounds / n)) for i in range(n)} for n in reps
    ]
    plan = []
    for round_ in range(rounds):
        members = [v for v, rounds_of in enumerate(runs_in) if round_ in rounds_of]
        shift = round_ % len(members) if members else 0
        plan.append(members[shift:] + members[:shift])
    return plan


def run_interleaved(variants: Sequence[Variant], label: str) -> None:
    """Warm every variant up, then time them round-robin (see :func:`schedule`)."""
    rounds = max(v.reps for v in variants)
    with _gc_frozen():
        for variant in variants:
            for _ in range(variant.warmup):
                time_once(variant, record=False)
        for round_, members in enumerate(schedule([v.reps for v in variants], rounds)):
            for i in members:
                time_once(variants[i])
            print(f"[{label}] round {round_ + 1}/{rounds} done", file=sys.stderr, flush=True)


def saved_for_backward_mib(variant: Variant) -> float:
    """MiB of distinct storages autograd keeps for the backward pass of one forward pass.

    Storages are keyed by address so that views of one tensor (and a tensor saved by
    several ops) count once.  The graph is discarded without a backward pass, so the
    weights are left unchanged.
    """
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    if variant.setup is not None:
        variant.setup()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = variant.forward()
    del loss
    return sum(storages.values()) / 2**20


def time_variants(variants: Sequence[Variant], label: str) -> list[dict[str, Any]]:
    """Time ``variants`` interleaved, measure their memory and summarise them.

    Returns
    -------
    list of dict
        One row per variant, as :func:`summarise` makes them.
    """
    run_interleaved(variants, label)
    # After the timing, so that it cannot disturb it; it leaves the weights unchanged.
    saved = {v.name: saved_for_backward_mib(v) for v in variants}
    return summarise(variants, saved)


# -- summary -------------------------------------------------------------------------------
def quartiles(times: Sequence[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile of at least two samples."""
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, median, q3


def summarise(variants: Sequence[Variant], saved_mib: dict[str, float]) -> list[dict[str, Any]]:
    """One JSON-ready record per variant; ``ratio`` is against its baseline's median."""
    # The same estimator for baselines and rows, so a baseline's own ratio is exactly 1.
    medians = {v.name: quartiles(v.step_s)[1] for v in variants}
    rows = []
    for v in variants:
        q1, median, q3 = quartiles(v.step_s)
        ratio = median / medians[v.baseline]
        rows.append(
            {
                "section": v.section,
                "variant": v.name,
                **v.info,
                "reps": len(v.step_s),
                "warmup": v.warmup,
                "median_s": median,
                "q1_s": q1,
                "q3_s": q3,
                "iqr_s": q3 - q1,
                "min_s": min(v.step_s),
                "max_s": max(v.step_s),
                "median_forward_s": statistics.median(v.forward_s),
                "median_backward_s": statistics.median(v.backward_s),
                "baseline": v.baseline,
                "ratio": ratio,
                "target_ratio": v.target_ratio,
                "met": None if v.target_ratio is None else ratio <= v.target_ratio,
                "noisy": (q3 - q1) > NOISY_IQR_FRACTION * median,
                "saved_for_backward_mib": saved_mib[v.name],
                "loss_first": v.losses[0],
                "loss_last": v.losses[-1],
                "times_s": list(v.step_s),
            }
        )
    return rows


def met_cell(row: dict[str, Any]) -> str:
    """The "met?" cell of a row: ``-`` without a target, else ``yes`` or ``NO``."""
    return "-" if row["met"] is None else ("yes" if row["met"] else "NO")


def phase_cells(row: dict[str, Any]) -> list[str]:
    """A row's median forward and backward times and its saved-for-backward MiB, as cells."""
    return [
        f"{row['median_forward_s']:.4f}",
        f"{row['median_backward_s']:.4f}",
        f"{row['saved_for_backward_mib']:.1f}",
    ]


def noisy_note(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A warning naming the rows with noisy timings, or no lines at all."""
    noisy = [r["variant"] for r in rows if r.get("noisy")]
    if not noisy:
        return []
    return [
        f"**Noisy timings** (IQR > {NOISY_IQR_FRACTION:.0%} of the median) for "
        f"{', '.join(noisy)}: the machine was busy or throttled; rerun, raise --steps, "
        "or pin --threads below the number of cores."
    ]


def join_tables(rows: Sequence[dict[str, Any]], *tables: str) -> str:
    """A section's Markdown: the noisy-timings note for ``rows``, then ``tables``."""
    return "\n\n".join([*noisy_note(rows), *tables])

"""Running the comparison: the transfer benchmark's cached stages, then every run (in
worker processes, resumable: a finished run is read back), then the step timings."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..transfer import PRESETS as TRANSFER_PRESETS
from ..transfer import Preset as TransferPreset
from ..transfer.cells import Datasets
from ..transfer.data import Data, prepare_data
from ..transfer.prior import fit_prior
from ..transfer.sources import train_sources
from ..workers import spawn_pool
from .config import PATHS, Preset
from .runs import Run, run
from .timing import time_paths

__all__ = ["jobs_of", "run_all", "transfer_preset"]


def transfer_preset(preset: Preset, device: str = "cpu", amp: str = "off") -> TransferPreset:
    """The transfer benchmark's preset the runs use (``n_test`` test volumes), computing
    on ``device`` in mixed precision ``amp`` (:mod:`dwp.amp`).

    Raises
    ------
    ValueError
        A ``device`` this machine lacks, or a precision it does not run (one line naming
        ``device`` / ``amp``).
    """
    transfer = TRANSFER_PRESETS[preset.transfer]
    if preset.n_test is not None:
        transfer = transfer.replace(n_test=preset.n_test)
    # the transfer preset checks both; the device is in no key, amp in those of the training
    # stages and runs when not "off" (the float32 keys are those from before)
    return transfer.replace(device=device, amp=amp)


def jobs_of(preset: Preset) -> list[Run]:
    """Every run: each method by each path that supports its prior, and the fine-tuned
    deterministic baseline (PR), on every split."""
    runs = [
        Run(method, name, split)
        for split in preset.splits
        for method in preset.methods
        for name in preset.paths
        if method in PATHS[name].priors
    ]
    return runs + [Run("pretrained", "baseline", split) for split in preset.splits]


_WORKER: dict[str, Any] = {}


def _init_worker(context: dict[str, Any], threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(context, datasets=Datasets(context["transfer"], context["data"]))


def _run(job: Run) -> dict[str, Any]:
    w = _WORKER
    return run(job, w["preset"], w["transfer"], w["stages"], w["datasets"], w["work"], w["seed"])


def run_all(
    preset: Preset,
    work: Path,
    seed: int,
    *,
    device: str = "cpu",
    amp: str = "off",
    jobs: int = 1,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The records of every run and the timing rows, trained on ``device`` in mixed
    precision ``amp``; stages and runs are cached in ``work``."""
    started = time.perf_counter()
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    transfer = transfer_preset(preset, device, amp)
    # the cohorts generate a subject per thread given (the same files whatever the count)
    data: Data = prepare_data(transfer, work, seed, progress=progress, jobs=threads)
    sources = train_sources(transfer, data, work, seed)
    prior = fit_prior(transfer, data.key, sources, work, seed, progress)
    stages = {"sources": sources, "prior": prior}
    context = {
        "preset": preset,
        "transfer": transfer,
        "stages": stages,
        "data": data,
        "work": work,
        "seed": seed,
    }
    todo = jobs_of(preset)
    bar = tqdm(total=len(todo), desc="optimiser runs", disable=not progress)
    records: list[dict[str, Any]] = []
    if jobs > 1:
        # spawned, and terminated on leaving the block (benchmarks.workers)
        with spawn_pool(jobs, _init_worker, (context, max(1, threads // jobs))) as pool:
            for record in pool.imap(_run, todo):
                records.append(record)
                bar.update()
    else:
        _init_worker(context, threads)
        for job in todo:
            records.append(_run(job))
            bar.update()
    bar.close()
    torch.set_num_threads(threads)
    timing = time_paths(preset, transfer, seed) if preset.timing_rounds > 0 else []
    return {
        "records": records,
        "timing": timing,
        "prior": {k: prior[k] for k in ("n_kernels",) if k in prior},
        "wall_seconds": time.perf_counter() - started,
        "threads": threads,
        "jobs": jobs,
    }


def by_cell(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Records grouped by (method, path), splits in order."""
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: r["split"]):
        cells.setdefault((r["method"], r["path"]), []).append(r)
    return cells

"""The ``python -m benchmarks.regression`` / ``dwp-regression`` command: options, and one
run that trains the three sections' runs (:mod:`.runs`: one result file each under
``--work-dir``, where ``--engine`` sends them), then writes tables, JSON and figures."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from dwp.amp import PRECISIONS, check_precision
from dwp.devices import resolve_device
from dwp.extras import add_version_argument
from dwp.train_log import check_tensorboard

from ..grid import GridError, add_engine_arguments, engine_from_args
from ..report import DEFAULT_OUT_DIR, write_results
from ..workers import terminate_as_exit

# the package's docstring describes the whole benchmark; its first line is the command's help
from . import __doc__ as _package_doc
from .ablations import ablation_runs, render_ablations, select_ablations
from .bagnets import bagnet_runs, collect_bagnets
from .cohort import age_cohorts
from .config import PRESETS, RESOLUTION
from .figures import plot_hydranet, plot_importance, plot_local_maps
from .hydranet import PriorRun, collect_hydranet, hydranet_runs
from .importance import collect_importance, importance_run
from .report import ABLATIONS_HEADING, keep_ablations, render_markdown
from .runs import Runner, log, work_folder

__all__ = ["main", "parse_args"]

DEFAULT_WORK_DIR = Path("runs/regression")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command's options (``sys.argv[1:]`` when ``argv`` is ``None``)."""
    parser = argparse.ArgumentParser(
        prog="dwp-regression", description=_package_doc.split("\n\n")[0]
    )
    add_version_argument(parser)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads (default: torch's, all cores; use 1 when the machine is shared)",
    )  # fmt: skip
    parser.add_argument(
        "--tensorboard", type=Path, metavar="DIR",
        help="log every network's training as TensorBoard events in DIR/<section>/<network> "
        '(needs pip install "dwp[tensorboard]"; changes no result)',
    )  # fmt: skip
    parser.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK_DIR,
        help="where each run keeps its result file, in a folder per preset and seed; "
        f"finished runs are read back, not redone (default {DEFAULT_WORK_DIR})",
    )  # fmt: skip
    parser.add_argument(
        "--jobs", type=int, default=None,
        help="runs at a time, with --threads // --jobs torch threads each (default 1: one "
        "run at a time in this process; on SLURM, no cap)",
    )  # fmt: skip
    parser.add_argument(
        "--ablations", nargs="*", metavar="NAME",
        help="also run section (d), Hydranet's ablations (all: about 5x (b)'s smallest "
        "size), or only those NAMEd (e.g. hydranet_lr_3e_4; the other variants' rows are "
        "kept from the previous results of the same preset and seed); without it the "
        "report keeps the previous (d)",
    )  # fmt: skip
    parser.add_argument(
        "--device", default="cpu",
        help="where the networks train: cpu (default), cuda, cuda:N, mps; no part of a "
        "run's result (a finished run is read back on any device); the noise model stays "
        "on the CPU",
    )  # fmt: skip
    parser.add_argument(
        "--amp", default="off", metavar="{" + ",".join(PRECISIONS) + "}",
        help="mixed precision of the networks' training (dwp.amp): off (default, float32), "
        "bf16 (cpu, Ampere+ GPUs), fp16 (cuda); it changes the results, so its runs keep "
        "their own folder under --work-dir",
    )  # fmt: skip
    add_engine_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark with the options in ``argv``; returns the exit status (2: bad
    options, 1: runs failed, every other run finished)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        engine = engine_from_args(args)
        if args.tensorboard is not None:  # installed and writable: one line now, not mid-run
            check_tensorboard(args.tensorboard, needed_by="--tensorboard")
        if any(n is not None and n < 1 for n in (args.jobs, args.threads)):
            raise ValueError("--jobs and --threads must be >= 1")
        jobs = args.jobs or (None if engine.remote else 1)
        args.device = str(resolve_device(args.device, "--device"))
        # checked here, not by argparse's choices: one line naming --amp, and the device's
        # precisions (fp16 needs CUDA) are known only now
        check_precision(args.amp, args.device, "--amp")
        if args.ablations is not None:
            args.ablations = select_ablations(args.ablations)
        # submitit's executor starts here: an option it rejects fails before any run
        runner = Runner(engine, args.work_dir.absolute(), jobs, args.threads or threads)
    except (ImportError, ValueError) as error:  # ImportError: one line naming the extra
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = shlex.join(
        ["python", "-m", "benchmarks.regression", *(sys.argv[1:] if argv is None else argv)]
    )
    torch.set_num_threads(args.threads or threads)
    try:
        with terminate_as_exit():  # SIGTERM ends the worker processes too
            return _run(args, command, runner)
    except GridError as error:  # every other run finished; a rerun retries the failed ones
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:  # a caller (a test, a notebook) keeps its own setting
        torch.set_num_threads(threads)


def _previous_ablation_rows(
    path: Path, seed: int, now: set[str], amp: str = "off"
) -> list[dict[str, Any]]:
    """The section (d) rows of the results file ``path`` of a run with ``seed`` and mixed
    precision ``amp`` whose ablation is not in ``now`` (empty when there is no such file)."""
    if not path.exists():
        return []
    payload = json.loads(path.read_text())
    config = payload.get("config", {})
    # a results file from before --amp is a float32 run's
    if config.get("seed") != seed or config.get("amp", "off") != amp:
        return []
    return [
        r
        for r in payload.get("rows", [])
        if r.get("section") == "ablation" and r.get("ablation") not in now
    ]


def _run(args: argparse.Namespace, command: str, runner: Runner) -> int:
    preset = PRESETS[args.preset]
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # absolute: submitit jobs may start in another folder
    folder = work_folder(args.work_dir.absolute(), preset, args.seed, args.amp)
    tensorboard = args.tensorboard and args.tensorboard.absolute()
    log(f"runs in {folder}")

    # wave 1: the BagNets, the source prior and every run that reads neither; wave 2: the
    # runs that read their files (the deep-prior regressors, the noise model)
    bagnets = bagnet_runs(preset, args.seed, folder, tensorboard)
    prior = PriorRun(folder=folder, preset=preset, seed=args.seed, tensorboard=tensorboard)
    hydra = hydranet_runs(preset, args.seed, folder, prior.tensors, tensorboard)
    ablations = (
        [] if args.ablations is None else ablation_runs(preset, args.seed, folder, args.ablations)
    )
    # longest first, so that the wave ends on short runs and no worker idles long while
    # the last long one finishes
    independent = sorted([r for r in hydra if r.prior is None] + ablations, key=lambda r: -r.cost())
    bagnets, independent, hydra = (
        [replace(r, device=args.device, amp=args.amp) for r in runs]
        for runs in (bagnets, independent, hydra)
    )
    prior = replace(prior, device=args.device, amp=args.amp)
    runner.wave([*bagnets, prior, *independent])
    # a run whose input failed is not started (it would fail too)
    ready = [r for r in hydra if r.prior is not None and prior.finished()]
    noise = [importance_run(bagnets)] if all(r.finished() for r in bagnets) else []
    runner.wave([*ready, *noise])
    runner.check()

    t = time.perf_counter()
    age_train, age_test = age_cohorts(preset, args.seed)
    timings = {"data": time.perf_counter() - t}
    bag = collect_bagnets(bagnets, age_train, age_test)
    hydra_rows = collect_hydranet(hydra)
    imp = collect_importance(noise[0], age_test, bag)
    prior_info = prior.record()["info"]
    # compute seconds of each section's runs, whenever and wherever they ran
    timings["bagnet"] = sum(r.record()["seconds"] for r in bagnets)
    timings["hydranet"] = sum(r.record()["seconds"] for r in [prior, *hydra])
    timings["importance"] = noise[0].record()["seconds"]
    ablation_rows = collect_hydranet(ablations)
    timings["ablations"] = sum(r.record()["seconds"] for r in ablations)
    for section in ("bagnet", "hydranet", "importance", "ablations"):
        print(f"{section} {timings[section]:.0f} s", flush=True)

    suffix = "" if args.preset == "quick" else f"_{args.preset}"
    if ablations:  # the variants not run now: their rows of the previous run, if any
        ablation_rows += _previous_ablation_rows(
            out / f"regression{suffix}.json",
            args.seed,
            {r.ablation.name for r in ablations},
            args.amp,
        )
    plot_local_maps(age_test, bag, out / f"regression{suffix}_local_maps.png")
    plot_hydranet(hydra_rows, out / f"regression{suffix}_hydranet.png")
    plot_importance(age_test, imp, out / f"regression{suffix}_importance.png")
    wall = time.perf_counter() - start
    timings["total"] = wall
    markdown = render_markdown(args.preset, bag, hydra_rows, prior_info, imp, wall)
    previous = out / f"regression{suffix}.md"
    if ablations:
        markdown += f"\n\n{ABLATIONS_HEADING}\n\n{render_ablations(ablation_rows, hydra_rows)}"
    else:  # the previous run's (d), if any
        markdown = keep_ablations(previous.read_text() if previous.exists() else None, markdown)
    rows = bag["rows"] + [bag["baseline"]] + hydra_rows + imp["rows"] + ablation_rows
    config = {
        "preset": args.preset,
        **asdict(preset),
        "seed": args.seed,
        "amp": args.amp,
        "threads": torch.get_num_threads(),
        "resolution_mm": RESOLUTION,
        "dwp_prior": prior_info,
        "timings_s": timings,
        "execution": {
            "engine": runner.engine.describe(),
            "jobs": runner.jobs,
            "threads_per_run": runner.job.threads,
            "work_folder": str(folder),
            "runs_done_now": runner.submitted,
        },
    }
    write_results(f"regression{suffix}", config, rows, markdown, out, command=command)
    print(markdown)
    return 0

"""The ``python -m benchmarks.regression`` / ``dwp-regression`` command: options, and one
run that loads the cohorts, runs the three sections and writes tables, JSON and figures."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from ..report import DEFAULT_OUT_DIR, write_results

# the package's docstring describes the whole benchmark; its first line is the command's help
from . import __doc__ as _package_doc
from .bagnets import run_bagnets
from .cohort import load_cohort
from .config import AGE_CROP, LESION_CROP, PRESETS, RESOLUTION
from .figures import plot_hydranet, plot_importance, plot_local_maps
from .hydranet import fit_source_prior, run_hydranet
from .importance import run_importance
from .report import render_markdown

__all__ = ["main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command's options (``sys.argv[1:]`` when ``argv`` is ``None``)."""
    parser = argparse.ArgumentParser(
        prog="dwp-regression", description=_package_doc.split("\n\n")[0]
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads (default: torch's, all cores; use 1 when the machine is shared)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark with the options in ``argv``; returns the exit status."""
    args = parse_args(argv)
    command = shlex.join(
        ["python", "-m", "benchmarks.regression", *(sys.argv[1:] if argv is None else argv)]
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        return _run(args, command)
    finally:  # a caller (a test, a notebook) keeps its own setting
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, command: str) -> int:
    preset = PRESETS[args.preset]
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.perf_counter

    t = stamp()
    age_train = load_cohort("brain_age", preset.age_train, "train", args.seed, AGE_CROP, "zscore")
    age_test = load_cohort("brain_age", preset.age_test, "test", args.seed, AGE_CROP, "zscore")
    lesion_pool = load_cohort(
        "lesion_count", max(preset.lesion_sizes), "train", args.seed, LESION_CROP, "minmax"
    )
    lesion_test = load_cohort(
        "lesion_count", preset.lesion_test, "test", args.seed, LESION_CROP, "minmax"
    )
    timings = {"data": stamp() - t}
    print(f"data {timings['data']:.0f} s", flush=True)

    t = stamp()
    bag = run_bagnets(preset, args.seed, age_train, age_test)
    timings["bagnet"] = stamp() - t
    print(f"bagnets {timings['bagnet']:.0f} s", flush=True)
    t = stamp()
    prior, prior_info = fit_source_prior(preset, args.seed)
    hydra = run_hydranet(preset, args.seed, prior, lesion_test, lesion_pool)
    timings["hydranet"] = stamp() - t
    print(f"hydranet {timings['hydranet']:.0f} s", flush=True)
    t = stamp()
    imp = run_importance(preset, args.seed, age_train, age_test, bag)
    timings["importance"] = stamp() - t
    print(f"importance {timings['importance']:.0f} s", flush=True)

    suffix = "" if args.preset == "quick" else f"_{args.preset}"
    plot_local_maps(age_test, bag, out / f"regression{suffix}_local_maps.png")
    plot_hydranet(hydra, out / f"regression{suffix}_hydranet.png")
    plot_importance(age_test, imp, out / f"regression{suffix}_importance.png")
    wall = time.perf_counter() - start
    timings["total"] = wall
    markdown = render_markdown(args.preset, bag, hydra, prior_info, imp, wall)
    rows = bag["rows"] + [bag["baseline"]] + hydra + imp["rows"]
    config = {
        "preset": args.preset,
        **asdict(preset),
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "resolution_mm": RESOLUTION,
        "dwp_prior": prior_info,
        "timings_s": timings,
    }
    write_results(f"regression{suffix}", config, rows, markdown, out, command=command)
    print(markdown)
    return 0

"""The command line: ``python -m benchmarks.variational`` (``dwp-variational``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from dwp.amp import PRECISIONS, check_precision
from dwp.devices import resolve_device
from dwp.extras import add_version_argument

from ..report import DEFAULT_OUT_DIR, write_results
from ..workers import terminate_as_exit
from .config import PRESETS
from .pipeline import run_all
from .report import render, summarise

__all__ = ["main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from . import __doc__ as description

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.variational",
        description=(description or "").split("\n\n")[0],
    )
    add_version_argument(parser)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="results folder")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("runs/transfer"),
        help="cache of the transfer stages and of the runs (default runs/transfer, shared "
        "with the transfer benchmark)",
    )
    parser.add_argument("--jobs", type=int, default=min(2, torch.get_num_threads()))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the source nets, the prior, the runs and the step timings compute: cpu "
        "(default), cuda, cuda:N, mps; in no cache key (finished stages and runs are read "
        "back on any device); the test volumes are scored on the CPU",
    )
    parser.add_argument(
        "--amp",
        default="off",
        metavar="{" + ",".join(PRECISIONS) + "}",
        help="mixed precision of the training (dwp.amp): off (default, float32), bf16 (cpu, "
        "Ampere+ GPUs), fp16 (cuda); it changes the results, so it is in the keys of the "
        "training stages and runs when not off",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and write ``variational[_<preset>].md`` / ``.json``; returns the
    exit status (2: a bad ``--device`` / ``--amp``, one line, before anything is written)."""
    args = parse_args(argv)
    try:
        args.device = str(resolve_device(args.device, "--device"))
        # not argparse's choices: one line naming --amp, and fp16 needs CUDA
        check_precision(args.amp, args.device, "--amp")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "-m", "benchmarks.variational", *(argv or sys.argv[1:])])
    preset = PRESETS[args.preset]
    with terminate_as_exit():  # SIGTERM ends the worker processes too
        result = run_all(
            preset,
            args.work_dir,
            args.seed,
            device=args.device,
            amp=args.amp,
            jobs=args.jobs,
            threads=args.threads,
            progress=not args.no_progress,
        )
    summary = summarise(result["records"])
    markdown = render(summary, result["timing"], preset, result)
    config = {
        "preset": args.preset,
        **asdict(preset),
        "seed": args.seed,
        "device": args.device,
        "amp": args.amp,
        "jobs": result["jobs"],
        "threads": result["threads"],
        "wall_seconds": result["wall_seconds"],
        "summary": summary,
    }
    name = "variational" if args.preset == "quick" else f"variational_{args.preset}"
    rows = [*result["records"], *({"timing": True, **r} for r in result["timing"])]
    write_results(name, config, rows, markdown, args.out, command=command)
    print(markdown)
    return 0

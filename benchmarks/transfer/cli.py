"""The command line: ``python -m benchmarks.transfer`` (console script ``dwp-transfer``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from dwp.extras import add_version_argument
from dwp.train_log import check_tensorboard

from ..grid import GridError, add_engine_arguments, engine_from_args
from ..workers import terminate_as_exit
from .cells import parse_only
from .config import PRESETS, REGIMES, override
from .execution import default_jobs, merge_regimes, run_regimes
from .report import write_report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dwp-transfer",
        description="Learned weight priors (DWP, kernel Gaussian, SWAG) against tuned "
        "fine-tuning, L2-SP, frozen fine-tuning, random init and N(0, 1), in a near- and a "
        "far-transfer regime (Kuzina et al. 2019, extended).",
    )
    add_version_argument(parser)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("runs/transfer"),
        help="where stages cache their outputs (default runs/transfer)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results"),
        help="where the report goes (default benchmarks/results)",
    )
    parser.add_argument("--name", help="report file name (default transfer[_<preset>])")
    parser.add_argument(
        "--regimes",
        nargs="+",
        choices=sorted(REGIMES),
        help="the transfer regimes to run (default: the preset's, near and far; --set regimes=...)",
    )
    parser.add_argument("--only", help="run some cells only, e.g. method=dwp,size=5+10,split=0")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="WORK_DIR",
        help="write the report from finished cells of these work folders",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a preset setting (repeatable), e.g. dwp_beta=1e-4",
    )
    parser.add_argument(
        "--device",
        help="where to train and fit: cpu (default), cuda, cuda:N, mps (--set device=...); "
        "not part of any cache key: finished stages are reused on another device",
    )
    parser.add_argument(
        "--amp",
        choices=("off", "bf16", "fp16"),
        help="mixed precision of every training stage (dwp.amp; --set amp=...)",
    )
    parser.add_argument("--source-data", type=Path, help="your source Decathlon folder")
    parser.add_argument("--target-data", type=Path, help="your target Decathlon folder")
    parser.add_argument(
        "--jobs",
        type=int,
        help="runs trained at a time (default: CPU count, at most 2; on SLURM, no cap)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads in all (default: torch's count); each of the --jobs runs gets "
        "threads // jobs, and a run's numbers depend on that count",
    )
    parser.add_argument(
        "--tensorboard",
        type=Path,
        metavar="DIR",
        help="log each cell's training as TensorBoard events in DIR/<method>-<hash>/n<size>/"
        'split<split> (needs pip install "dwp[tensorboard]"; changes no result)',
    )
    parser.add_argument("--no-progress", action="store_true")
    add_engine_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        regimes = ",".join(args.regimes or ())
        where = [
            f"{k}={v}"
            for k, v in (("device", args.device), ("amp", args.amp), ("regimes", regimes))
            if v
        ]
        preset = override(PRESETS[args.preset], [*args.set, *where])
        only = parse_only(args.only)
        engine = engine_from_args(args)
        if args.tensorboard is not None:  # installed and writable, before any stage runs
            check_tensorboard(args.tensorboard, needed_by="--tensorboard")
    except (ValueError, ImportError) as error:  # ImportError: one line naming the extra
        print(f"error: {error}", file=sys.stderr)
        return 2
    if (args.jobs is not None and args.jobs < 1) or (args.threads is not None and args.threads < 1):
        print("error: --jobs and --threads must be >= 1", file=sys.stderr)
        return 2
    jobs = args.jobs if args.jobs is not None or engine.remote else default_jobs()
    name = args.name or ("transfer" if args.preset == "quick" else f"transfer_{args.preset}")
    command = "python -m benchmarks.transfer " + " ".join(
        sys.argv[1:] if argv is None else list(argv)
    )
    progress = not args.no_progress
    try:
        if args.merge:
            plans = merge_regimes(
                preset,
                args.merge,
                args.seed,
                source_data=args.source_data,
                target_data=args.target_data,
            )
        else:
            with terminate_as_exit():  # SIGTERM ends the worker processes too
                plans = run_regimes(
                    preset,
                    args.work_dir,
                    args.seed,
                    only=only,
                    source_data=args.source_data,
                    target_data=args.target_data,
                    progress=progress,
                    jobs=jobs,
                    threads=args.threads,
                    engine=engine,
                    tensorboard=args.tensorboard,
                )
    except (ValueError, OSError) as error:  # DataError and CheckpointError are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return 2
    except GridError as error:  # every other run finished; a rerun retries the failed ones
        print(f"error: {error}", file=sys.stderr)
        return 1
    if only:
        for regime, plan in plans.items():
            for record in plan.records:
                keys = ("method", "size", "split", "dice", "iou", "val_dice")
                print(json.dumps({"regime": regime, **{k: record[k] for k in keys}}))
        return 0
    write_report(plans, args.out, name, command)
    print((args.out / f"{name}.md").read_text())
    return 0

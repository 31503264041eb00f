"""Command line: ``dwp-cohorts generate | list | figure`` (also ``python -m cohorts``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cohorts.anatomy import RESOLUTIONS
from cohorts.subjects import COHORTS, TUMOUR_COHORTS
from dwp.extras import add_version_argument

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dwp-cohorts",
        description="Synthetic MRI cohorts on the MNI ICBM152 anatomy (no download).",
    )
    add_version_argument(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="write a cohort (cached and resumable)")
    gen.add_argument("--cohort", required=True, help=f"one of: {', '.join(COHORTS)}")
    gen.add_argument("--out", required=True, help="output folder")
    gen.add_argument("--n-train", type=int, required=True, help="training subjects")
    gen.add_argument("--n-test", type=int, default=0, help="test subjects (default 0)")
    gen.add_argument(
        "--resolution",
        type=float,
        default=2,
        help=f"voxel size in mm, one of {list(RESOLUTIONS)} (default 2)",
    )
    gen.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    gen.add_argument(
        "--whole-tumour",
        action="store_true",
        help=f"binary tumour labels ({', '.join(TUMOUR_COHORTS)} only)",
    )
    gen.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="subjects generated at a time, in worker processes (default 1); the files are "
        "the same whatever the number",
    )
    gen.add_argument("--overwrite", action="store_true", help="regenerate every subject")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    commands.add_parser("list", help="list the cohorts")
    fig = commands.add_parser("figure", help="PNG of a source and a target subject")
    fig.add_argument("--out", default="benchmarks/results/cohorts.png")
    fig.add_argument("--resolution", type=float, default=2)
    fig.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad arguments)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        for spec in COHORTS.values():
            print(f"{spec.name:15s} {spec.task:13s} {spec.description}")
        return 0
    try:
        if args.command == "generate":
            from cohorts.writer import generate

            path = generate(
                args.cohort,
                args.out,
                n_train=args.n_train,
                n_test=args.n_test,
                resolution=args.resolution,
                seed=args.seed,
                overwrite=args.overwrite,
                progress=not args.quiet,
                whole_tumour=args.whole_tumour,
                jobs=args.jobs,
            )
        else:
            from cohorts.figure import make_figure

            path = make_figure(args.out, resolution=args.resolution, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))  # prints usage and the message, exits with status 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

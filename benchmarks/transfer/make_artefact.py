"""``python -m benchmarks.transfer.make_artefact``: make (or check) the committed source
artefact of a preset (:mod:`.artefact`).

Runs the preset's data, source and prior stages in ``--work-dir`` (reusing what is cached
there) with ``--threads`` torch threads, then copies what the target runs read into
``benchmarks/artefacts/``; ``--check`` compares the files with the committed artefact's
checksums instead (the stages are deterministic on a CPU for a given thread count)::

    python -m benchmarks.transfer.make_artefact --preset quick --seed 0 --threads 2
    python -m benchmarks.transfer.make_artefact --preset quick --seed 0 --threads 2 --check
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from dwp.extras import add_version_argument

from .artefact import ARTEFACTS, artefact_name, differences, export
from .config import PRESETS, override
from .data import prepare_data
from .prior import fit_prior
from .sources import train_sources


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.transfer.make_artefact``: run (or reuse) a preset's source and
    prior stages in ``--work-dir`` and write their artefact (``--check``: compare with
    the committed one instead)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.transfer.make_artefact",
        description="Make (or --check) the committed source artefact of a transfer preset.",
    )
    add_version_argument(parser)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/transfer"))
    parser.add_argument("--out", type=Path, default=ARTEFACTS)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed artefact, write nothing"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        preset = override(PRESETS[args.preset], args.set)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    data = prepare_data(preset, args.work_dir, args.seed, progress=progress, jobs=args.threads)
    sources = train_sources(preset, data, args.work_dir, args.seed, progress=progress)
    fit_prior(preset, data.key, sources, args.work_dir, args.seed, progress=progress)
    if args.check:
        committed = args.out / artefact_name(preset, args.seed, data.key)
        differ = differences(committed, args.work_dir)
        print(
            f"{committed}: "
            + (f"differs in {differ}" if differ else "regenerated: the same files, timings aside")
        )
        return 1 if differ else 0
    folder = export(
        preset, args.seed, data.key, args.work_dir, args.out, preset_name=args.preset,
        threads=args.threads,
    )  # fmt: skip
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

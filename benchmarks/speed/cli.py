"""The command line: ``python -m benchmarks.speed`` and the ``dwp-speed`` script."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import dwp
from dwp.devices import resolve_device
from dwp.extras import add_version_argument

from ..report import DEFAULT_OUT_DIR, write_results
from .fit import run_fit
from .kl import run_kl
from .layers import run_layers
from .machine import OtherLoad, tune_glibc_malloc
from .precision import run_precision
from .results import markdown, merge_previous, run_record
from .settings import FULL, MIN_REPORT_STEPS, MIN_SIZE, QUICK, SECTIONS
from .unet3d import run_unet3d

__all__ = ["RUNNERS", "main", "parse_args"]

RUNNERS = {
    "layers": run_layers,
    "kl": run_kl,
    "fit": run_fit,
    "unet3d": run_unet3d,
    "precision": run_precision,
}


def _sections(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(SECTIONS)}, got {text!r}"
        )
    return [s for s in SECTIONS if s in names]  # canonical order, no duplicates


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.speed",
        description="Time Bayesian UNet3D training steps (reparam, local_reparam, flipout), "
        "the deep weight prior's KL bound and the kernel VAE fit.",
    )
    add_version_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="torch seed (default 0)")
    parser.add_argument(
        "--sections",
        type=_sections,
        default=list(SECTIONS),
        help=f"comma-separated sections to run (default {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"timed rounds per variant (default {FULL.steps}, {QUICK.steps} with --quick; "
        f"at least {MIN_REPORT_STEPS} unless --quick); the slow kl variants run "
        f"{FULL.heavy_reps} ({QUICK.heavy_reps} with --quick)",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help=f"edge of the cubic input volume, a multiple of 8 >= {MIN_SIZE} "
        f"(default {FULL.size}, {QUICK.size} with --quick)",
    )
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="let cuDNN time its convolution algorithms for each shape and keep the fastest "
        "(torch.backends.cudnn.benchmark; GPU only)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the precision section runs: cpu (default), cuda, cuda:N; on a GPU at "
        "the paper's 128^3 patches (the other sections run on the CPU)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help=f"results directory (default {DEFAULT_OUT_DIR})",
    )
    parser.add_argument(
        "--system-allocator",
        action="store_true",
        help="leave glibc's malloc thresholds at their defaults (see tune_glibc_malloc)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK.size}^3 volume, widths {QUICK.widths}, few rounds, "
        f"{QUICK.fit_epochs} fit epochs on {QUICK.fit_kernels} kernels, inference on "
        f"{'x'.join(map(str, QUICK.inference_volume))}; written as speed_quick.*",
    )
    parser.add_argument(
        "--replace",
        action="store_true",
        help="write only the sections run (default: keep the other sections' results "
        "already in the results file)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line, filling in the --quick-dependent settings.

    Parameters
    ----------
    argv
        As for :func:`main`.

    Returns
    -------
    argparse.Namespace
        The flags, and the sizes of :data:`~benchmarks.speed.settings.FULL` or
        :data:`~benchmarks.speed.settings.QUICK` as the sections read them (``heavy``,
        ``widths``, ``fit_epochs``, ``strategy_size``, ``inference_volume``...).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    if args.steps is None:
        args.steps = preset.steps
    if args.size is None:
        args.size = preset.size
    if args.steps < 2:
        parser.error("--steps must be at least 2 (an IQR needs two samples)")
    if not args.quick and args.steps < MIN_REPORT_STEPS:
        parser.error(
            f"--steps must be at least {MIN_REPORT_STEPS} for a reported run (or use --quick)"
        )
    if args.size < MIN_SIZE or args.size % 8:
        parser.error(f"--size must be a multiple of 8 and at least {MIN_SIZE}, got {args.size}")
    if args.batch < 1:
        parser.error("--batch must be positive")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be positive")
    try:
        args.device = str(resolve_device(args.device, "--device"))
    except ValueError as error:
        parser.error(str(error))
    args.heavy = min(args.steps, preset.heavy_reps)
    args.widths = preset.widths
    args.wide_widths = preset.wide_widths
    args.fit_epochs = preset.fit_epochs
    args.fit_kernels = preset.fit_kernels
    args.strategy_size = preset.strategy_size
    args.strategy_widths = preset.widths
    args.inference_volume = preset.inference_volume
    args.inference_roi = preset.inference_roi
    args.inference_samples = preset.inference_samples
    args.amp_size = preset.amp_size
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen sections, print the tables and write ``speed[_quick].{json,md}``.

    Sections not run keep their results from an existing ``speed[_quick].json`` in the
    output folder (see :func:`~benchmarks.speed.results.merge_previous`; ``--replace``
    writes only the sections run).

    Parameters
    ----------
    argv
        Command-line arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        0 (targets missed are reported, not an error: wall times depend on the machine).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    allocator = "system default" if args.system_allocator else tune_glibc_malloc()
    command = shlex.join(["python", "-m", "benchmarks.speed", *argv])
    start = time.perf_counter()

    rows: list[dict[str, Any]] = []
    section_configs: dict[str, Any] = {}
    section_wall: dict[str, float] = {}
    other_cores: dict[str, float | None] = {}
    for section in args.sections:
        t0 = time.perf_counter()
        with OtherLoad().measure() as load:
            section_rows, section_config, _ = RUNNERS[section](args)
        section_wall[section] = time.perf_counter() - t0
        other_cores[section] = load.cores
        section_config["other_processes_cores"] = load.cores
        rows += section_rows
        section_configs[section] = section_config
        print(f"[{section}] done in {section_wall[section]:.1f} s", file=sys.stderr, flush=True)

    total = time.perf_counter() - start
    run = run_record(args, command, allocator)
    config = {
        "seed": args.seed,
        "sections": list(args.sections),
        "quick": args.quick,
        "size": args.size,
        "batch": args.batch,
        "cudnn_benchmark": args.cudnn_benchmark,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "allocator": allocator,
        "validation": dwp.settings.validation_enabled(),
        **section_configs,
        "section_wall_s": section_wall,
        "other_processes_cores": other_cores,
        "section_runs": {s: run for s in args.sections},
        "total_wall_s": total,
    }
    name = "speed_quick" if args.quick else "speed"
    if not args.replace:
        rows, config = merge_previous(Path(args.out) / f"{name}.json", args.sections, rows, config)
    body, commands = markdown(rows, config)
    json_path, md_path = write_results(name, config, rows, body, args.out, command=commands)

    print(body)
    print(f"\ntotal {total:.1f} s; wrote {json_path} and {md_path}")
    return 0

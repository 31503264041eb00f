"""Training-step speed of Bayesian 3D convolutions relative to their deterministic twin.

Times one training step (forward, loss, backward, SGD step) of a U-Net-shaped 3D conv
stack, once with plain ``nn.Conv3d`` layers and once per estimator with the same stack
turned Bayesian by :func:`dwp.bayesianize`, and compares each Bayesian variant's median
step time with the deterministic one measured in the same run.

Usage::

    python -m benchmarks.speed --seed 0            # full run, writes benchmarks/results/speed.*
    python -m benchmarks.speed --quick --out /tmp  # smoke run (16^3, 3 rounds): speed_quick.*

Methodology
-----------
* Every variant starts from the same weights (``bayesianize`` copies the deterministic
  network's weights into the posterior means) and sees the same input.
* Each variant is warmed up (allocator, oneDNN primitive caches), then the variants are
  timed **round-robin** for ``--steps`` rounds, so slow drifts of the machine (thermal,
  other load) hit every variant alike; the starting variant rotates each round so that no
  variant always runs right after the same other one.
* Reported: median and inter-quartile range of the step time, and the ratio of medians to
  the deterministic baseline.  Wall times are machine-dependent and never asserted.
* Memory: the bytes of distinct tensor storages autograd keeps for the backward pass
  after one forward pass (activations plus the few weights it saves).  Unlike the
  process-wide, monotone ``ru_maxrss``, this is a clean per-variant number on any device.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import itertools
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dwp

from .report import DEFAULT_OUT_DIR, markdown_table, write_results

__all__ = ["TARGETS", "UNetLikeStack", "main", "unet_like_stack"]

#: Largest acceptable ratio of median step times, Bayesian / deterministic, per estimator.
TARGETS: dict[str, float] = {"reparam": 1.25, "local_reparam": 2.3, "flipout": 2.5}
DETERMINISTIC = "deterministic"
#: Fewer timed rounds give a median and IQR too noisy to compare against the targets.
MIN_REPORT_STEPS = 10
DEFAULT_STEPS = 10
DEFAULT_SIZE = 48
QUICK_STEPS = 3
QUICK_SIZE = 16
WARMUP_STEPS = 2
#: Three stride-2 levels must leave at least 2^3 voxels for InstanceNorm at the bottom.
MIN_SIZE = 16
SGD_LR = 1e-3
#: An IQR above this fraction of the median flags a variant's timings as noisy.
NOISY_IQR_FRACTION = 0.2
CHANNELS = (16, 32, 32, 64)

ConvFactory = Callable[..., nn.Module]


# -- the allocator -------------------------------------------------------------------------
#: glibc's mallopt parameter numbers (malloc.h) and the value used for both.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_THRESHOLD = 1 << 30


def tune_glibc_malloc() -> str:
    """Keep freed memory in the process instead of returning it to the OS (glibc only).

    By default glibc serves allocations above a few MiB with fresh ``mmap`` pages and
    returns freed heap tops to the OS, so every training step page-faults its large
    activation tensors back in (measured here: ~45,000 faults and ~0.1 s of system time per
    step of this stack).  Estimators that allocate more temporaries pay more, which
    distorts the ratios.  Raising both thresholds is what the environment variables
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (or jemalloc / tcmalloc, as
    PyTorch's CPU tuning guide recommends) do.  Applied once, before any variant runs, so
    the baseline and every variant share it.

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


# -- the network ---------------------------------------------------------------------------
def _preact(in_ch: int, out_ch: int, conv: ConvFactory, stride: int = 1) -> nn.Sequential:
    """Pre-activation unit: InstanceNorm3d -> ReLU -> 3x3x3 conv (no bias: a norm follows)."""
    return nn.Sequential(
        nn.InstanceNorm3d(in_ch, affine=True),
        nn.ReLU(),
        conv(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False),
    )


class UNetLikeStack(nn.Module):
    """An encoder-decoder 3D conv stack with the shape of the paper's U-Net.

    A stand-in for timing until the real ``unet3d.UNet3D`` lands: it has the same levels,
    channel widths and kinds of layers, which is what the cost of a training step depends
    on, but no claim to segment anything.

    Levels of ``channels`` (default 16, 32, 32, 64) are joined by stride-2 pre-activation
    convs (48^3 -> 24^3 -> 12^3 -> 6^3 for a 48^3 input).  The decoder reduces channels
    with a 3x3x3 conv at the coarse level (cheaper than after upsampling), upsamples
    trilinearly, adds the encoder's skip and applies one more unit; a 1x1x1 conv maps to
    ``out_channels`` class scores.

    Parameters
    ----------
    conv
        Factory with ``nn.Conv3d``'s signature, e.g. ``nn.Conv3d`` or ``dwp.BayesConv3d``.
    in_channels, out_channels
        Input modalities and output classes.
    channels
        Feature channels per resolution level, finest first.
    """

    def __init__(
        self,
        conv: ConvFactory = nn.Conv3d,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = CHANNELS,
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        pairs = list(itertools.pairwise(channels))
        self.stem = conv(in_channels, channels[0], kernel_size=3, padding=1, bias=False)
        self.encoder = nn.ModuleList(_preact(c, c, conv) for c in channels)
        self.down = nn.ModuleList(_preact(fine, coarse, conv, stride=2) for fine, coarse in pairs)
        # Decoder modules are stored coarsest first, the order in which forward uses them.
        self.up = nn.ModuleList(_preact(coarse, fine, conv) for fine, coarse in reversed(pairs))
        self.decoder = nn.ModuleList(_preact(fine, fine, conv) for fine, _ in reversed(pairs))
        self.head = nn.Sequential(
            nn.InstanceNorm3d(channels[0], affine=True),
            nn.ReLU(),
            conv(channels[0], out_channels, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        skips = []
        for level, block in enumerate(self.encoder):
            if level > 0:
                x = self.down[level - 1](x)
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck output is not a skip
        for up, block in zip(self.up, self.decoder, strict=True):
            skip = skips.pop()
            # Upsample to the skip's size, not by 2: odd sizes round up on the way down.
            x = F.interpolate(up(x), size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = block(x + skip)
        return self.head(x)


def unet_like_stack(conv: ConvFactory = nn.Conv3d) -> UNetLikeStack:
    """The benchmark's U-Net-shaped stack (a stand-in for ``unet3d.UNet3D``).

    Parameters
    ----------
    conv
        Conv layer factory with ``nn.Conv3d``'s signature.

    Returns
    -------
    UNetLikeStack
        1 input channel, 2 output classes, channel widths 16, 32, 32, 64.
    """
    return UNetLikeStack(conv)


# -- one variant and its measurements -------------------------------------------------------
@dataclass
class Variant:
    """One network under test, with its optimiser and the measurements taken so far."""

    name: str
    model: nn.Module
    estimator: str | None
    optimizer: torch.optim.Optimizer = field(init=False)
    step_s: list[float] = field(default_factory=list)
    forward_s: list[float] = field(default_factory=list)
    backward_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=SGD_LR)

    @property
    def bayesian(self) -> bool:
        """Whether the network has Bayesian layers (and its loss a KL term)."""
        return self.estimator is not None


def build_variants(seed: int) -> list[Variant]:
    """The deterministic stack and one Bayesian copy per estimator, all with equal weights."""
    torch.manual_seed(seed)
    base = unet_like_stack().train()
    variants = [Variant(DETERMINISTIC, base, None)]
    for est in TARGETS:
        # bayesianize deep-copies `base`, so every variant starts from the same weights.
        variants.append(Variant(est, dwp.bayesianize(base, estimator=est), est))
    return variants


def _loss(variant: Variant, x: Tensor, target: Tensor) -> Tensor:
    """MSE against a zero target, plus the KL for Bayesian variants (an unweighted ELBO)."""
    loss = F.mse_loss(variant.model(x), target)
    if variant.bayesian:
        loss = loss + dwp.kl(variant.model)
    return loss


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
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


def train_step(variant: Variant, x: Tensor, target: Tensor, record: bool = True) -> None:
    """Run and time one training step: forward + loss (+ KL), backward, SGD step.

    ``forward_s`` covers the forward pass, the loss and the KL; ``backward_s`` the
    backward pass and the optimiser step.  ``record=False`` runs a warm-up step.
    """
    with _gc_paused():
        start = time.perf_counter()
        variant.optimizer.zero_grad(set_to_none=True)
        loss = _loss(variant, x, target)
        mid = time.perf_counter()
        loss.backward()
        variant.optimizer.step()
        end = time.perf_counter()
    variant.losses.append(loss.item())
    if record:
        variant.step_s.append(end - start)
        variant.forward_s.append(mid - start)
        variant.backward_s.append(end - mid)


def saved_for_backward_mib(variant: Variant, x: Tensor, target: Tensor) -> float:
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

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(variant, x, target)
    del loss
    return sum(storages.values()) / 2**20


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


def run_interleaved(variants: Sequence[Variant], x: Tensor, target: Tensor, steps: int) -> None:
    """Warm every variant up, then time ``steps`` round-robin rounds over all variants."""
    with _gc_frozen():
        for variant in variants:
            for _ in range(WARMUP_STEPS):
                train_step(variant, x, target, record=False)
        n = len(variants)
        for round_ in range(steps):
            # Rotate the starting variant so none always follows the same neighbour.
            for i in range(n):
                train_step(variants[(round_ + i) % n], x, target)
            print(f"round {round_ + 1}/{steps} done", file=sys.stderr, flush=True)


# -- summary and report --------------------------------------------------------------------
def quartiles(times: Sequence[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile of at least two samples."""
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, median, q3


def summarise(variants: Sequence[Variant], saved_mib: dict[str, float]) -> list[dict[str, Any]]:
    """One JSON-ready record per variant; ratios are against the deterministic median."""
    # The same estimator for baseline and rows, so the baseline's own ratio is exactly 1.
    baseline = quartiles(variants[0].step_s)[1]
    rows = []
    for v in variants:
        q1, median, q3 = quartiles(v.step_s)
        target = TARGETS.get(v.name)
        ratio = median / baseline
        rows.append(
            {
                "variant": v.name,
                "estimator": v.estimator,
                "steps": len(v.step_s),
                "median_s": median,
                "q1_s": q1,
                "q3_s": q3,
                "iqr_s": q3 - q1,
                "min_s": min(v.step_s),
                "max_s": max(v.step_s),
                "median_forward_s": statistics.median(v.forward_s),
                "median_backward_s": statistics.median(v.backward_s),
                "ratio_vs_deterministic": ratio,
                "target_ratio": target,
                "met": None if target is None else ratio <= target,
                "noisy": (q3 - q1) > NOISY_IQR_FRACTION * median,
                "saved_for_backward_mib": saved_mib[v.name],
                "parameters": sum(p.numel() for p in v.model.parameters()),
                "loss_first": v.losses[0],
                "loss_last": v.losses[-1],
                "times_s": list(v.step_s),
            }
        )
    return rows


def render_tables(rows: Sequence[dict[str, Any]], quick: bool) -> str:
    """The headline table (ratios vs targets) and a forward/backward/memory breakdown."""
    headline = markdown_table(
        ["variant", "median step (s)", "IQR", "ratio vs deterministic", "target", "met?"],
        [
            [
                r["variant"],
                f"{r['median_s']:.4f}",
                f"{r['iqr_s']:.4f}",
                f"{r['ratio_vs_deterministic']:.2f}x",
                "baseline" if r["target_ratio"] is None else f"<= {r['target_ratio']:.2f}x",
                "-" if r["met"] is None else ("yes" if r["met"] else "NO"),
            ]
            for r in rows
        ],
    )
    breakdown = markdown_table(
        [
            "variant",
            "median forward+loss+KL (s)",
            "median backward+SGD (s)",
            "saved for backward (MiB)",
        ],
        [
            [
                r["variant"],
                f"{r['median_forward_s']:.4f}",
                f"{r['median_backward_s']:.4f}",
                f"{r['saved_for_backward_mib']:.1f}",
            ]
            for r in rows
        ],
    )
    notes = []
    if quick:
        notes.append("**QUICK smoke run: too small and too short to compare with the targets.**")
    noisy = [r["variant"] for r in rows if r["noisy"]]
    if noisy:
        notes.append(
            f"**Noisy timings** (IQR > {NOISY_IQR_FRACTION:.0%} of the median) for "
            f"{', '.join(noisy)}: the machine was busy or throttled; rerun, raise --steps, "
            "or pin --threads below the number of cores."
        )
    header = "".join(f"{note}\n\n" for note in notes)
    return f"{header}{headline}\n\nBreakdown:\n\n{breakdown}"


# -- command line --------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.speed",
        description="Time a training step of a U-Net-shaped 3D conv stack, deterministic vs "
        "bayesianized (reparam, local_reparam, flipout).",
    )
    parser.add_argument("--seed", type=int, default=0, help="torch seed (default 0)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"timed rounds per variant (default {DEFAULT_STEPS}, {QUICK_STEPS} with --quick; "
        f"at least {MIN_REPORT_STEPS} unless --quick)",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help=f"edge of the cubic input volume, a multiple of 8 >= {MIN_SIZE} "
        f"(default {DEFAULT_SIZE}, {QUICK_SIZE} with --quick)",
    )
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
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
        help="smoke run: small volume, few rounds; written as speed_quick.*",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line, filling in the --quick-dependent defaults."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    if args.size is None:
        args.size = QUICK_SIZE if args.quick else DEFAULT_SIZE
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
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table and write ``speed[_quick].{json,md}``.

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
    allocator = "system default" if args.system_allocator else tune_glibc_malloc()
    start = time.perf_counter()

    variants = build_variants(args.seed)
    x = torch.randn(args.batch, 1, args.size, args.size, args.size)
    target = torch.zeros(args.batch, 2, args.size, args.size, args.size)
    run_interleaved(variants, x, target, args.steps)
    # After the timing, so that it cannot disturb it; it leaves the weights unchanged.
    saved_mib = {v.name: saved_for_backward_mib(v, x, target) for v in variants}

    rows = summarise(variants, saved_mib)
    table = render_tables(rows, args.quick) + f"\n\nAllocator: {allocator}."
    config = {
        "seed": args.seed,
        "steps": args.steps,
        "warmup_steps": WARMUP_STEPS,
        "size": args.size,
        "batch": args.batch,
        "input_shape": list(x.shape),
        "threads": torch.get_num_threads(),
        "allocator": allocator,
        "quick": args.quick,
        "network": "unet_like_stack (stand-in for unet3d.UNet3D)",
        "channels": list(CHANNELS),
        "loss": "mse(output, 0) + dwp.kl(model) for Bayesian variants",
        "optimizer": f"SGD(lr={SGD_LR})",
        "validation": dwp.settings.validation_enabled(),
        "targets": TARGETS,
        "total_wall_s": time.perf_counter() - start,
    }
    name = "speed_quick" if args.quick else "speed"
    command = shlex.join(["python", "-m", "benchmarks.speed", *argv])
    json_path, md_path = write_results(name, config, rows, table, args.out, command=command)

    print(table)
    print(f"\ntotal {config['total_wall_s']:.1f} s; wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

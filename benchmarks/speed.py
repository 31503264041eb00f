"""Speed of Bayesian 3D U-Net training: layer estimators, the deep weight prior, VAE fitting,
the unet3d application's strategies and inference.

Four sections, each run by default and selectable with ``--sections``:

``layers``
    One training step (forward, loss + KL, backward, SGD step) of the reference
    :class:`unet3d.UNet3D` (default widths, 726,480 parameters), once deterministic and once
    per estimator with its 3x3x3 convs turned Bayesian by
    ``dwp.bayesianize(net, include=kernel3_layers(net), estimator=...)`` (the paper keeps
    the 1x1x1 convs deterministic), each as a ratio to the deterministic step.
``kl``
    What the deep weight prior adds to a training step: ``dwp.kl(model)`` and its
    ``.backward()`` alone (no network forward), for the default MLP
    :class:`dwp.KernelVAE` over UNet3D's 26,640 3x3x3 kernels (one VAE, and seven, one per
    resolution group as in the MRI paper), over the 4x wider UNet3D's 426,048 kernels, and
    for the paper's conv VAE; each as a ratio to the deterministic training step of the
    U-Net it belongs to, measured in the same interleaved run.
``fit``
    Wall time of ``dwp.fit_kernel_vae`` (default settings, 50 epochs) on 100,000 kernels.
``unet3d``
    One step of :func:`unet3d.train.train`'s loop (the strategy's loss and parameter
    groups, Adam) of the default UNet3D at 64^3, batch 2, for every strategy of
    :data:`unet3d.strategies.STRATEGIES`, as a ratio to ``random_init`` (interleaved as
    above); then :func:`unet3d.inference.predict_volume` on a 240 x 240 x 155 volume
    (64^3 windows, overlap 0.5): deterministic, and Bayesian with 1 and 8 posterior samples.
    Each inference case runs once, in a fresh interpreter, which reports its wall time and
    its peak RSS above the RSS after building the model and the input (``VmHWM`` reset
    through ``/proc/self/clear_refs``).

Usage::

    python -m benchmarks.speed --seed 0            # full run, writes benchmarks/results/speed.*
    python -m benchmarks.speed --sections kl       # one section; the other sections' results
                                                   # in speed.json / speed.md are kept
    python -m benchmarks.speed --quick --out /tmp  # smoke run (tiny everything): speed_quick.*

Methodology
-----------
* Every variant of a section is built from the same seeded weights and sees the same input.
* Each variant is warmed up (allocator, oneDNN primitive caches), then the variants of a
  section are timed **round-robin**, so slow drifts of the machine (thermal, other load)
  hit every variant alike; the starting variant rotates each round.  Variants too slow for
  every round (the 4x wider U-Net's step, the conv VAE) take part in a few rounds spread
  evenly over the run.
* Reported: median and inter-quartile range, and the ratio of medians to a baseline
  measured in the same run.  Wall times are machine-dependent and never asserted.
* glibc's allocator is tuned once, before anything runs, for every variant and baseline.
* Other processes: each section records how many cores other processes kept busy on
  average (``/proc/stat`` minus this process's CPU time).  On a 2-core machine a single
  busy neighbour stalls every 2-thread op, inflating times several-fold; the fit, a
  single unrepeated measurement without an IQR, is flagged ``noisy`` by this alone.
* Memory: the bytes of distinct tensor storages autograd keeps for the backward pass
  after one forward pass.  Unlike the process-wide, monotone ``ru_maxrss``, this is a
  clean per-variant number on any device.  Inference, whose peak is the number that
  matters, is measured as peak RSS instead, one fresh process per case.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dwp
from unet3d import UNet3D, count_kernels, kernel3_layers
from unet3d.strategies import STRATEGIES, ModelSpec, Strategy, get_strategy

from . import report
from .report import DEFAULT_OUT_DIR, markdown_table, write_results

__all__ = [
    "FIT_TARGET_S",
    "KL_TARGET",
    "LAYER_TARGETS",
    "SECTIONS",
    "main",
    "parse_args",
    "tune_glibc_malloc",
]

SECTIONS = ("layers", "kl", "fit", "unet3d")
#: Largest acceptable ratio of median step times, Bayesian / deterministic, per estimator.
LAYER_TARGETS: dict[str, float] = {"reparam": 1.25, "local_reparam": 2.3, "flipout": 2.5}
#: Largest acceptable (KL bound forward + backward) / (deterministic training step), MLP VAE.
KL_TARGET = 0.10
#: Largest acceptable wall time of the VAE fit (seconds).
FIT_TARGET_S = 120.0
DETERMINISTIC = "deterministic"

#: Fewer timed rounds give a median and IQR too noisy to compare against the targets.
MIN_REPORT_STEPS = 10
DEFAULT_STEPS = 10
QUICK_STEPS = 3
#: Timed repetitions of the slow variants (4x wider U-Net step, conv VAE bound).
HEAVY_REPS = 3
QUICK_HEAVY_REPS = 2
DEFAULT_SIZE = 48
QUICK_SIZE = 16
WARMUP_STEPS = 2
HEAVY_WARMUP_STEPS = 1
#: UNet3D's three stride-2 levels need a multiple of 8 and 2^3 voxels at the bottom.
MIN_SIZE = 16
SGD_LR = 1e-3
#: An IQR above this fraction of the median flags a variant's timings as noisy.
NOISY_IQR_FRACTION = 0.2

WIDTHS = (16, 32, 32, 64)
WIDE_WIDTHS = (64, 128, 128, 256)  # "4x wider": 16x the 3x3x3 kernels
QUICK_WIDTHS = (4, 8, 8, 16)
QUICK_WIDE_WIDTHS = (8, 16, 16, 32)  # 2x in the smoke run, to keep it fast

FIT_EPOCHS = 50
FIT_KERNELS = 100_000
FIT_SOURCES = 4
QUICK_FIT_EPOCHS = 2
QUICK_FIT_KERNELS = 3_000

#: unet3d section: the issue's 64^3 training step (independent of --size) and a BraTS-sized
#: volume (240 x 240 x 155) for sliding-window inference.
STRATEGY_SIZE = 64
BASELINE_STRATEGY = "random_init"
#: Training-set size N of the ELBO's N / B scaling (it changes the loss, not the cost).
STRATEGY_N_DATA = 10
ADAM_LR = 1e-3
INFERENCE_VOLUME = (240, 240, 155)
INFERENCE_ROI = 64
INFERENCE_OVERLAP = 0.5
#: Posterior samples of the Bayesian inference cases (the deterministic case makes 1 pass).
INFERENCE_SAMPLES = (1, 8)
QUICK_INFERENCE_VOLUME = (24, 24, 20)
QUICK_INFERENCE_ROI = 16
#: One Bayesian case: every case costs a fresh interpreter (seconds of imports).
QUICK_INFERENCE_SAMPLES = (2,)
#: Prefix of the result line a fresh inference process prints on stdout.
INFERENCE_RESULT_TAG = "SPEED_INFERENCE_RESULT "


# -- the allocator -------------------------------------------------------------------------
#: glibc's mallopt parameter numbers (malloc.h) and the value used for both.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_THRESHOLD = 1 << 30


def tune_glibc_malloc() -> str:
    """Keep freed memory in the process instead of returning it to the OS (glibc only).

    By default glibc serves allocations above a few MiB with fresh ``mmap`` pages and
    returns freed heap tops to the OS, so every training step page-faults its large
    activation tensors back in (measured on the earlier stand-in stack: ~45,000 faults and
    ~0.1 s of system time per step).  Estimators that allocate more temporaries pay more,
    which distorts the ratios.  Raising both thresholds is what the environment variables
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (or jemalloc / tcmalloc, as
    PyTorch's CPU tuning guide recommends) do.  Applied once, before any variant runs, so
    the baselines and every variant share it.

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


# -- other processes ----------------------------------------------------------------------
#: Other processes using more than this many cores on average flag a section as disturbed.
BUSY_OTHER_CORES = 0.2


def _busy_cpu_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux ``/proc/stat``), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait
    ticks = [int(v) for v in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


@dataclass
class OtherLoad:
    """Average number of cores that *other* processes kept busy during a block.

    On a 2-core machine one busy neighbour is enough to stall every 2-thread parallel op
    of ours (measured: a 5-epoch VAE fit took 65 s instead of 6.4 s), so every section
    records this as an objective noise indicator next to its IQRs.
    """

    cores: float | None = None

    @contextlib.contextmanager
    def measure(self) -> Iterator[OtherLoad]:
        busy0, own0, wall0 = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
        try:
            yield self
        finally:
            busy1, own1, wall = _busy_cpu_s(), _own_cpu_s(), time.perf_counter() - wall0
            if busy0 is not None and busy1 is not None and wall > 0:
                self.cores = max(0.0, (busy1 - busy0) - (own1 - own0)) / wall


def _own_cpu_s() -> float:
    # children too: the unet3d section's inference processes are ours, not "other" load
    # (their times count once they have been waited for, i.e. by the end of the block)
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _busy_note(section_loads: dict[str, float | None]) -> list[str]:
    busy = {s: c for s, c in section_loads.items() if c is not None and c > BUSY_OTHER_CORES}
    if not busy:
        return []
    listed = ", ".join(f"{s} {c:.2f}" for s, c in busy.items())
    return [
        f"**Machine busy**: other processes kept on average {listed} cores (of "
        f"{os.cpu_count()}) busy during these sections; a busy neighbour stalls every "
        "multi-threaded op, so their times are inflated (the fit's most: it is a single, "
        "unrepeated measurement). Rerun on an idle machine, or pin --threads 1."
    ]


# -- one timed variant ----------------------------------------------------------------------
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


def training_step(
    model: nn.Module, x: Tensor, target: Tensor, bayesian: bool
) -> tuple[Callable[[], Tensor], Callable[[Tensor], None]]:
    """Forward/backward callables of one SGD training step of ``model``.

    The loss is MSE against ``target`` plus, for Bayesian models, ``dwp.kl(model)`` (an
    unweighted ELBO).  Forward covers zeroing the gradients, the forward pass, the loss and
    the KL; backward the backward pass and the optimiser step.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR)

    def forward() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), target)
        return loss + dwp.kl(model) if bayesian else loss

    def backward(loss: Tensor) -> None:
        loss.backward()
        optimizer.step()

    return forward, backward


def kl_step(model: nn.Module) -> tuple[Callable[[], Tensor], Callable[[Tensor], None]]:
    """Forward/backward callables of the KL bound alone: ``dwp.kl(model)``, ``.backward()``."""

    def forward() -> Tensor:
        model.zero_grad(set_to_none=True)  # leaves the parameters, so any shared sample, as is
        return dwp.kl(model)

    def backward(kl: Tensor) -> None:
        kl.backward()

    return forward, backward


def forward_samples(model: nn.Module) -> Callable[[], None]:
    """Untimed setup of a KL variant: draw every Bayesian layer's weights as its ``reparam``
    forward pass would (:meth:`~dwp.nn.BayesianLayer.sample_weight`), so that the bound
    shares them as it does inside a training step."""

    def setup() -> None:
        for _, layer in dwp.bayesian_layers(model):
            layer.sample_weight()

    return setup


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
    with _gc_paused():
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


def _met(row: dict[str, Any]) -> str:
    return "-" if row["met"] is None else ("yes" if row["met"] else "NO")


def _noisy_note(rows: Sequence[dict[str, Any]]) -> list[str]:
    noisy = [r["variant"] for r in rows if r.get("noisy")]
    if not noisy:
        return []
    return [
        f"**Noisy timings** (IQR > {NOISY_IQR_FRACTION:.0%} of the median) for "
        f"{', '.join(noisy)}: the machine was busy or throttled; rerun, raise --steps, "
        "or pin --threads below the number of cores."
    ]


def _join(notes: Sequence[str], *tables: str) -> str:
    return "\n\n".join([*notes, *tables])


# -- section: layer estimators --------------------------------------------------------------
def layer_variants(seed: int, widths: Sequence[int], x: Tensor, reps: int) -> list[Variant]:
    """The deterministic UNet3D and one copy per estimator with Bayesian 3x3x3 convs."""
    torch.manual_seed(seed)
    base = UNet3D(widths=widths).train()
    target = torch.zeros(x.shape[0], base.n_classes, *x.shape[2:])
    bayesian_layers = kernel3_layers(base)
    models: list[tuple[str, nn.Module, str | None]] = [(DETERMINISTIC, base, None)]
    for est in LAYER_TARGETS:
        # bayesianize deep-copies `base`, so every variant starts from the same weights.
        net = dwp.bayesianize(base, include=bayesian_layers, estimator=est)
        models.append((est, net, est))
    variants = []
    for name, model, est in models:
        forward, backward = training_step(model, x, target, bayesian=est is not None)
        info = {
            "estimator": est,
            "parameters": sum(p.numel() for p in model.parameters()),
            "bayesian_layers": 0 if est is None else len(bayesian_layers),
        }
        variants.append(
            Variant(
                "layers",
                name,
                forward,
                backward,
                reps,
                baseline=DETERMINISTIC,
                target_ratio=LAYER_TARGETS.get(name),
                info=info,
            )
        )
    return variants


def render_layers(rows: Sequence[dict[str, Any]]) -> str:
    """The headline table (ratios vs targets) and a forward/backward/memory breakdown."""
    headline = markdown_table(
        ["variant", "median step (s)", "IQR", "ratio vs deterministic", "target", "met?"],
        [
            [
                r["variant"],
                f"{r['median_s']:.4f}",
                f"{r['iqr_s']:.4f}",
                f"{r['ratio']:.2f}x",
                "baseline" if r["target_ratio"] is None else f"<= {r['target_ratio']:.2f}x",
                _met(r),
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
            "parameters",
        ],
        [
            [
                r["variant"],
                f"{r['median_forward_s']:.4f}",
                f"{r['median_backward_s']:.4f}",
                f"{r['saved_for_backward_mib']:.1f}",
                f"{r['parameters']:,}",
            ]
            for r in rows
        ],
    )
    return _join(_noisy_note(rows), headline, "Breakdown:", breakdown)


def run_layers(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Time the layer estimators; return the rows, the section's config and its tables."""
    torch.manual_seed(args.seed)
    x = torch.randn(args.batch, 1, args.size, args.size, args.size)
    variants = layer_variants(args.seed, args.widths, x, args.steps)
    run_interleaved(variants, "layers")
    # After the timing, so that it cannot disturb it; it leaves the weights unchanged.
    saved = {v.name: saved_for_backward_mib(v) for v in variants}
    rows = summarise(variants, saved)
    config = {
        "network": "unet3d.UNet3D",
        "widths": list(args.widths),
        "bayesian_layers": "kernel3_layers(net): the 3x3x3 convs; 1x1x1 convs deterministic",
        "prior": "dwp.NormalPrior() (bayesianize's default)",
        "input_shape": list(x.shape),
        "steps": args.steps,
        "warmup_steps": WARMUP_STEPS,
        "loss": "mse(output, 0) + dwp.kl(model) for Bayesian variants",
        "optimizer": f"SGD(lr={SGD_LR})",
        "targets": LAYER_TARGETS,
    }
    return rows, config, render_layers(rows)


# -- section: the deep weight prior's KL bound ----------------------------------------------
def _default_vae_text() -> str:
    """The MLP KernelVAE's default sizes for 3x3x3 kernels (for the configs' text)."""
    vae = dwp.KernelVAE((3, 3, 3))
    return f"hidden {vae.hidden}, latent {vae.latent_dim}"


def _dwp_network(
    net: nn.Module,
    vaes: dict[str, dwp.KernelVAE],
    layer_groups: dict[str, str] | None = None,
    kernel_fraction: float = 1.0,
) -> nn.Module:
    """``net`` with Bayesian 3x3x3 convs under a deep weight prior of ``vaes``."""
    prior = dwp.DeepWeightPrior(vaes, layer_groups, kernel_fraction=kernel_fraction)
    return dwp.bayesianize(net, prior, include=kernel3_layers(net))


def kl_variants(
    seed: int, widths: Sequence[int], wide_widths: Sequence[int], x: Tensor, reps: int, heavy: int
) -> list[Variant]:
    """Deterministic training steps of both U-Nets and the KL bounds measured against them."""
    torch.manual_seed(seed)
    kernel = (3, 3, 3)
    net, wide = UNet3D(widths=widths).train(), UNet3D(widths=wide_widths).train()
    target = torch.zeros(x.shape[0], net.n_classes, *x.shape[2:])
    # The VAEs are untrained: the cost of the bound does not depend on their weights.
    bank = dwp.collect_kernels(
        net, group_by="resolution", include=kernel3_layers(net), example_input=x[:1]
    )
    groups = {g: len(k) for g, k in bank.groups().items()}
    models = {
        "kl_mlp_1vae": _dwp_network(net, {"all": dwp.KernelVAE(kernel)}),
        "kl_mlp_1vae_own": _dwp_network(net, {"all": dwp.KernelVAE(kernel)}),
        "kl_mlp_7vae": _dwp_network(
            net, {g: dwp.KernelVAE(kernel) for g in bank.group_names}, dict(bank.layer_groups)
        ),
        "kl_conv_1vae": _dwp_network(net, {"all": dwp.KernelVAE(kernel, architecture="conv")}),
        "kl_mlp_1vae_wide": _dwp_network(wide, {"all": dwp.KernelVAE(kernel)}),
        "kl_mlp_1vae_wide_own": _dwp_network(wide, {"all": dwp.KernelVAE(kernel)}),
        # not the default: an unbiased estimate on half the kernels per step
        "kl_mlp_1vae_wide_half": _dwp_network(
            wide, {"all": dwp.KernelVAE(kernel)}, kernel_fraction=0.5
        ),
    }
    step, step_wide = "step_unet3d", "step_unet3d_wide"

    def unet_info(widths_: Sequence[int], model: nn.Module) -> dict[str, Any]:
        return {"widths": list(widths_), "kernels": count_kernels(model)}

    def vae_info(model: nn.Module, arch: str, n_vaes: int) -> dict[str, Any]:
        vae = next(m for m in model.modules() if isinstance(m, dwp.KernelVAE))
        # decoder weights are buffers in a prior: count the whole state
        size = sum(t.numel() for t in vae.state_dict().values())
        return {"architecture": arch, "vaes": n_vaes, "vae_weights_each": size}

    def dwp_variant(
        name: str, baseline: str, arch: str, n_vaes: int, shared: bool = True, **kw: Any
    ) -> Variant:
        model = models[name]
        source = wide if baseline == step_wide else net
        info = {
            "what": "dwp.kl(model) + backward",
            # in a training step the reparam forward pass has drawn the weights, and the
            # bound shares that sample; dwp.kl without a forward pass draws its own
            "weight_sample": "forward's" if shared else "own",
            **unet_info(source.widths, source),
            **vae_info(model, arch, n_vaes),
        }
        if n_vaes > 1:
            info["groups"] = groups
        return Variant(
            "kl",
            name,
            *kl_step(model),
            baseline=baseline,
            target_ratio=None if arch == "conv" else KL_TARGET,
            info=info,
            setup=forward_samples(model) if shared else None,
            **kw,
        )

    def step_variant(name: str, model: nn.Module, **kw: Any) -> Variant:
        info = {
            "what": f"deterministic UNet3D training step, input {list(x.shape)}",
            **unet_info(model.widths, model),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        return Variant(
            "kl", name, *training_step(model, x, target, bayesian=False), info=info, **kw
        )

    slow = {"reps": heavy, "warmup": HEAVY_WARMUP_STEPS}
    return [
        step_variant(step, net, reps=reps),
        dwp_variant("kl_mlp_1vae", step, "mlp", 1, reps=reps),
        dwp_variant("kl_mlp_1vae_own", step, "mlp", 1, shared=False, reps=reps),
        dwp_variant("kl_mlp_7vae", step, "mlp", len(groups), reps=reps),
        dwp_variant("kl_conv_1vae", step, "conv", 1, **slow),
        step_variant(step_wide, wide, **slow),
        dwp_variant("kl_mlp_1vae_wide", step_wide, "mlp", 1, reps=reps),
        dwp_variant("kl_mlp_1vae_wide_own", step_wide, "mlp", 1, shared=False, reps=reps),
        dwp_variant("kl_mlp_1vae_wide_half", step_wide, "mlp", 1, reps=reps),
    ]


def render_kl(rows: Sequence[dict[str, Any]]) -> str:
    """The ratio table and a forward/backward/memory breakdown."""
    headline = markdown_table(
        [
            "variant",
            "U-Net widths",
            "3x3x3 kernels",
            "VAE",
            "weight sample",
            "reps",
            "median (s)",
            "IQR",
            "ratio vs step",
            "target",
            "met?",
        ],
        [
            [
                r["variant"],
                "-".join(map(str, r["widths"])),
                f"{r['kernels']:,}",
                "-" if "architecture" not in r else f"{r['vaes']} x {r['architecture']}",
                r.get("weight_sample", "-"),
                r["reps"],
                f"{r['median_s']:.4f}",
                f"{r['iqr_s']:.4f}",
                "baseline" if r["baseline"] == r["variant"] else f"{r['ratio']:.1%}",
                (
                    ("baseline" if r["baseline"] == r["variant"] else "none")
                    if r["target_ratio"] is None
                    else f"<= {r['target_ratio']:.0%}"
                ),
                _met(r),
            ]
            for r in rows
        ],
    )
    breakdown = markdown_table(
        ["variant", "ratio of", "median forward (s)", "median backward (s)", "saved (MiB)"],
        [
            [
                r["variant"],
                r["baseline"],
                f"{r['median_forward_s']:.4f}",
                f"{r['median_backward_s']:.4f}",
                f"{r['saved_for_backward_mib']:.1f}",
            ]
            for r in rows
        ],
    )
    return _join(_noisy_note(rows), headline, "Breakdown:", breakdown)


def run_kl(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Time the KL bounds against the deterministic steps; rows, config and tables."""
    torch.manual_seed(args.seed)
    x = torch.randn(args.batch, 1, args.size, args.size, args.size)
    variants = kl_variants(args.seed, args.widths, args.wide_widths, x, args.steps, args.heavy)
    run_interleaved(variants, "kl")
    saved = {v.name: saved_for_backward_mib(v) for v in variants}
    rows = summarise(variants, saved)
    config = {
        "network": "unet3d.UNet3D",
        "widths": list(args.widths),
        "wide_widths": list(args.wide_widths),
        "bayesian_layers": "kernel3_layers(net): the 3x3x3 convs; 1x1x1 convs deterministic",
        "input_shape": list(x.shape),
        "timed": "kl_*: dwp.kl(model) then .backward() (no network forward; the variants "
        "with the forward's weight sample draw it untimed first, with BayesianLayer."
        "sample_weight, as a reparam forward pass does); step_*: "
        "deterministic training step (mse(output, 0), backward, SGD)",
        "vaes": f"untrained KernelVAE((3, 3, 3)) (mlp: default {_default_vae_text()}; conv: "
        "the MRI paper's); DeepWeightPrior defaults (n_samples 1, no chunking, encoder "
        "trained, forward sample shared)",
        "groups": "kl_mlp_7vae: collect_kernels(group_by='resolution') on UNet3D",
        "steps": args.steps,
        "heavy_reps": args.heavy,
        "heavy_variants": ["kl_conv_1vae", "step_unet3d_wide"],
        "heavy_note": f"the heavy variants run {args.heavy} timed reps (after "
        f"{HEAVY_WARMUP_STEPS} warm-up) spread over the {args.steps} rounds; the others "
        f"{args.steps} (after {WARMUP_STEPS})",
        "target": f"MLP bound <= {KL_TARGET:.0%} of its U-Net's deterministic step; "
        "conv VAE: no target",
    }
    return rows, config, render_kl(rows)


# -- section: fitting the kernel VAE --------------------------------------------------------
def fit_kernels(seed: int, widths: Sequence[int], n: int) -> Tensor:
    """The first ``n`` 3x3x3 kernels of He-initialised UNet3Ds (as many as needed)."""
    torch.manual_seed(seed)
    per_net = count_kernels(UNet3D(widths=widths))
    nets = [UNet3D(widths=widths) for _ in range(max(FIT_SOURCES, -(-n // per_net)))]
    bank = dwp.collect_kernels(nets, group_by="all", include=kernel3_layers(nets[0]))
    if len(bank) < n:
        raise RuntimeError(f"collected {len(bank)} kernels, need {n}")
    return bank.kernels[:n]


def run_fit(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Time one VAE fit; rows, config and table."""
    kernels = fit_kernels(args.seed, args.widths, args.fit_kernels)
    # Early stopping must not end the run: patience beyond the budget, an unreachable
    # learning-rate floor (ReduceLROnPlateau only ever multiplies by 0.1).
    options = {
        "epochs": args.fit_epochs,
        "early_stopping": args.fit_epochs + 1,
        "min_lr": 0.0,
        "progress": False,
        "seed": args.seed,
    }
    with _gc_paused(), OtherLoad().measure() as load:
        start = time.perf_counter()
        fit = dwp.fit_kernel_vae(kernels, **options)
        wall = time.perf_counter() - start
    epochs = len(fit.history)
    row = {
        "section": "fit",
        "variant": "fit_kernel_vae_mlp",
        "kernels": len(kernels),
        "n_train": fit.n_train,
        "n_val": fit.n_val,
        "epochs_requested": args.fit_epochs,
        "epochs_run": epochs,
        "stopped": fit.stopped,
        "reps": 1,
        "median_s": wall,
        "iqr_s": None,
        "s_per_epoch": wall / max(epochs, 1),
        "baseline": "target",
        "ratio": wall / FIT_TARGET_S,
        "target_s": FIT_TARGET_S,
        "target_ratio": 1.0,
        "met": wall < FIT_TARGET_S,
        # one unrepeated measurement: no IQR, so other processes' load is the noise flag
        "noisy": None if load.cores is None else load.cores > BUSY_OTHER_CORES,
        "other_processes_cores": load.cores,
        "best_val_elbo": fit.best_val_elbo,
        "final_lr": fit.history[-1]["lr"] if fit.history else None,
        "times_s": [wall],
    }
    config = {
        "call": "dwp.fit_kernel_vae(kernels, epochs=E, early_stopping=E + 1, min_lr=0.0, "
        "progress=False, seed=SEED); all other settings default (mlp, "
        f"{_default_vae_text()}, batch 256, Adam lr 1e-3, val_fraction 0.1)",
        "options": options,
        "kernels": len(kernels),
        "kernel_source": f"first {len(kernels)} 3x3x3 kernels of He-initialised "
        f"UNet3D(widths={tuple(args.widths)}) models (random init: the fit's cost does "
        "not depend on the kernels' values)",
        "timing": "one run, wall clock (includes the held-out ELBO per epoch and the "
        "Gaussian baselines at the end)",
        "target_s": FIT_TARGET_S,
    }
    return [row], config, render_fit([row])


def render_fit(rows: Sequence[dict[str, Any]]) -> str:
    """The fit's table (one row per fit)."""
    return markdown_table(
        ["variant", "kernels", "epochs run", "wall (s)", "s / epoch", "target", "met?", "stopped"],
        [
            [
                r["variant"],
                f"{r['kernels']:,}",
                f"{r['epochs_run']} / {r['epochs_requested']}",
                f"{r['median_s']:.1f}",
                f"{r['s_per_epoch']:.2f}",
                f"< {r['target_s']:.0f} s",
                _met(r),
                r["stopped"],
            ]
            for r in rows
        ],
    )


# -- section: the unet3d application (strategies, sliding-window inference) ----------------
def _strategy_models(
    seed: int, widths: Sequence[int], source_dir: Path
) -> list[tuple[str, Strategy, nn.Module]]:
    """Every registered strategy's network, built the way :func:`unet3d.train.train` does."""
    torch.manual_seed(seed)
    spec = ModelSpec(widths=tuple(widths))
    # pretrained needs a source checkpoint: any UNet3D of the same widths (the step's cost
    # does not depend on the weights' values)
    source = source_dir / "source.pt"
    torch.save(UNet3D(widths=widths).state_dict(), source)
    # an untrained default MLP kernel VAE, as in the kl section: the bound's cost does not
    # depend on the VAE's weights either
    prior = dwp.DeepWeightPrior({"all": dwp.KernelVAE((3, 3, 3))})
    options: dict[str, dict[str, Any]] = {
        "random_init": {},
        "pretrained": {"source": source},
        "pretrained_frozen": {"source": source},
        "normal_prior": {},
        "dwp": {"prior_path": prior},
    }
    missing = set(STRATEGIES) - set(options)
    if missing:  # a new strategy must be added here, not silently skipped
        raise RuntimeError(f"no benchmark options for strategies {sorted(missing)}")
    built = []
    for name in STRATEGIES:
        torch.manual_seed(seed)  # every strategy starts from the same He initialisation
        strategy = get_strategy(name, **options[name])
        built.append((name, strategy, strategy.build_model(spec).train()))
    return built


def strategy_step(
    strategy: Strategy, model: nn.Module, x: Tensor, target: Tensor, n_data: int
) -> tuple[Callable[[], Tensor], Callable[[Tensor], None]]:
    """Forward/backward callables of one step of :func:`unet3d.train.train`'s loop.

    The strategy's own parameter groups (frozen blocks left out, posterior scales at their
    own learning rate) with Adam, the recipe's optimiser; the strategy's loss (the paper's
    loss, or the negative ELBO with the KL of every Bayesian layer).
    """
    optimizer = torch.optim.Adam(strategy.param_groups(model, ADAM_LR))
    steps = [0]

    def forward() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = strategy.loss(model, model(x), target, n_data, x.shape[0], steps[0])
        return loss

    def backward(loss: Tensor) -> None:
        loss.backward()
        optimizer.step()
        steps[0] += 1

    return forward, backward


def strategy_variants(
    seed: int, widths: Sequence[int], x: Tensor, reps: int, source_dir: Path
) -> list[Variant]:
    """One training-step variant per strategy, each timed against ``random_init``."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 2, (x.shape[0], *x.shape[2:]), generator=generator)
    variants = []
    for name, strategy, model in _strategy_models(seed, widths, source_dir):
        info = {
            "kind": "train_step",
            "strategy": name,
            "bayesian": strategy.bayesian,
            "widths": list(widths),
            "input_shape": list(x.shape),
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        step = strategy_step(strategy, model, x, target, STRATEGY_N_DATA)
        variants.append(Variant("unet3d", name, *step, reps, baseline=BASELINE_STRATEGY, info=info))
    return variants


def _rss_mib() -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of this process in MiB, from ``/proc/self/status``."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024  # kB
    return out


def _reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0); ``False`` if not."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def inference_worker(spec_json: str) -> None:
    """Time and measure one :func:`unet3d.inference.predict_volume` call; print a JSON line.

    Runs in a fresh interpreter (see :func:`run_inference_case`) so that the peak RSS
    belongs to this case alone (in a process that ran anything before, glibc's free lists
    would serve part of the prediction from memory already counted in the baseline): the
    model and the input are built and one window is predicted as a warm-up, the peak is
    reset to the current RSS (``/proc/self/clear_refs``), the prediction runs, and the new
    peak minus that baseline is what inference needed on top of the model and the input.
    """
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    if spec["tune_malloc"]:
        tune_glibc_malloc()
    from monai.inferers import sliding_window_inference  # noqa: F401  (in the baseline)

    from unet3d.inference import predict_volume

    torch.manual_seed(spec["seed"])
    model = UNet3D(widths=spec["widths"])
    if spec["bayesian"]:
        model = dwp.bayesianize(model, include=kernel3_layers(model))
    image = torch.rand(1, *spec["volume"])
    # warm-up on one window (oneDNN primitives, MONAI's lazy imports), outside the timing;
    # what it leaves resident is part of the baseline, as in any long-running predictor
    predict_volume(model, image[:, : spec["roi"], : spec["roi"], : spec["roi"]], 1)
    gc.collect()
    exact = _reset_peak_rss()
    before = _rss_mib()
    with OtherLoad().measure() as load:
        start = time.perf_counter()
        prediction = predict_volume(
            model,
            image,
            spec["samples"],
            roi_size=spec["roi"],
            overlap=spec["overlap"],
            seed=spec["seed"],
        )
        wall = time.perf_counter() - start
    after = _rss_mib()
    peak = after["VmHWM"] if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "wall_s": wall,
        "passes": prediction.n_samples,
        "baseline_rss_mib": before["VmRSS"],
        "peak_rss_mib": peak,
        "peak_above_baseline_mib": peak - before["VmRSS"],
        "memory_method": (
            "VmHWM after resetting it via /proc/self/clear_refs, minus VmRSS after model load"
            if exact
            else "ru_maxrss of the whole process (includes imports), minus VmRSS after model load"
        ),
        "other_processes_cores": load.cores,
        "mean_mutual_information": float(prediction.mutual_information.mean()),
    }
    print(INFERENCE_RESULT_TAG + json.dumps(result), flush=True)


def run_inference_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`inference_worker` in a fresh interpreter and return its result."""
    code = (
        "import sys; from benchmarks.speed import inference_worker; inference_worker(sys.argv[1])"
    )
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(INFERENCE_RESULT_TAG)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"inference worker failed (status {done.returncode}):\n{done.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len(INFERENCE_RESULT_TAG) :])


def inference_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Sliding-window inference: deterministic, then Bayesian with 1 and many samples."""
    cases = [("infer_deterministic", False, 1)] + [
        (f"infer_bayesian_{n}", True, n) for n in args.inference_samples
    ]
    rows: list[dict[str, Any]] = []
    for name, bayesian, samples in cases:
        spec = {
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "tune_malloc": not args.system_allocator,
            "widths": list(args.strategy_widths),
            "bayesian": bayesian,
            "samples": samples,
            "volume": list(args.inference_volume),
            "roi": args.inference_roi,
            "overlap": INFERENCE_OVERLAP,
        }
        print(f"[unet3d] inference {name} ...", file=sys.stderr, flush=True)
        result = run_inference_case(spec)
        wall = result["wall_s"]
        rows.append(
            {
                "section": "unet3d",
                "variant": name,
                "kind": "inference",
                "bayesian": bayesian,
                "samples": samples,
                "passes": result["passes"],
                "widths": spec["widths"],
                "volume": spec["volume"],
                "roi": spec["roi"],
                "overlap": spec["overlap"],
                "reps": 1,
                "median_s": wall,
                "iqr_s": None,
                "s_per_pass": wall / result["passes"],
                "baseline": "infer_deterministic",
                "ratio": None,  # filled in below
                "target_ratio": None,
                "met": None,
                # one unrepeated measurement: other processes' load is the noise flag
                "noisy": (
                    None
                    if result["other_processes_cores"] is None
                    else result["other_processes_cores"] > BUSY_OTHER_CORES
                ),
                **{k: v for k, v in result.items() if k not in ("wall_s", "passes")},
                "times_s": [wall],
            }
        )
    for row in rows:
        row["ratio"] = row["median_s"] / rows[0]["median_s"]
    return rows


def render_unet3d(rows: Sequence[dict[str, Any]]) -> str:
    """Training steps per strategy (ratio to random_init) and the inference table."""
    steps = [r for r in rows if r.get("kind") == "train_step"]
    infer = [r for r in rows if r.get("kind") == "inference"]
    parts = list(_noisy_note(steps))
    if steps:
        parts.append(
            markdown_table(
                [
                    "strategy",
                    "median step (s)",
                    "IQR",
                    "ratio vs random_init",
                    "forward+loss (s)",
                    "backward+Adam (s)",
                    "saved for backward (MiB)",
                    "trainable / parameters",
                ],
                [
                    [
                        r["variant"],
                        f"{r['median_s']:.4f}",
                        f"{r['iqr_s']:.4f}",
                        f"{r['ratio']:.2f}x",
                        f"{r['median_forward_s']:.4f}",
                        f"{r['median_backward_s']:.4f}",
                        f"{r['saved_for_backward_mib']:.1f}",
                        f"{r['trainable_parameters']:,} / {r['parameters']:,}",
                    ]
                    for r in steps
                ],
            )
        )
    if infer:
        parts.append("Sliding-window inference (`unet3d.inference.predict_volume`):")
        parts.append(
            markdown_table(
                [
                    "model",
                    "samples",
                    "volume",
                    "window / overlap",
                    "wall (s)",
                    "s / pass",
                    "ratio vs deterministic",
                    "peak RSS above model + input (MiB)",
                    "peak RSS (MiB)",
                    "other cores busy",
                ],
                [
                    [
                        "Bayesian" if r["bayesian"] else "deterministic",
                        r["samples"],
                        "x".join(map(str, r["volume"])),
                        f"{r['roi']}^3 / {r['overlap']}",
                        f"{r['median_s']:.3g}",
                        f"{r['s_per_pass']:.3g}",
                        f"{r['ratio']:.2f}x",
                        f"{r['peak_above_baseline_mib']:.0f}",
                        f"{r['peak_rss_mib']:.0f}",
                        "n/a"
                        if r["other_processes_cores"] is None
                        else f"{r['other_processes_cores']:.2f}",
                    ]
                    for r in infer
                ],
            )
        )
        parts.append(f"Peak memory: {infer[0]['memory_method']}, each case in a fresh process.")
    return "\n\n".join(parts)


def run_unet3d(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Time every strategy's training step and sliding-window inference."""
    torch.manual_seed(args.seed)
    size = args.strategy_size
    x = torch.randn(args.batch, 1, size, size, size)
    with tempfile.TemporaryDirectory(prefix="dwp-speed-") as tmp:
        variants = strategy_variants(args.seed, args.strategy_widths, x, args.steps, Path(tmp))
        run_interleaved(variants, "unet3d")
        saved = {v.name: saved_for_backward_mib(v) for v in variants}
    rows = summarise(variants, saved)
    rows += inference_rows(args)
    config = {
        "network": "unet3d.UNet3D",
        "widths": list(args.strategy_widths),
        "strategies": "unet3d.strategies.get_strategy(name, ...).build_model(ModelSpec()); "
        "pretrained / pretrained_frozen (freeze_depth 1) from a saved random UNet3D; "
        "normal_prior and dwp with their defaults (reparam, beta 1); dwp with an untrained "
        "default MLP KernelVAE (one group)",
        "input_shape": list(x.shape),
        "timed": "one step of unet3d.train's loop: zero_grad, forward, strategy.loss "
        f"(n_data {STRATEGY_N_DATA}), backward, Adam(strategy.param_groups(model, "
        f"{ADAM_LR})).step()",
        "steps": args.steps,
        "warmup_steps": WARMUP_STEPS,
        "baseline": BASELINE_STRATEGY,
        "inference": {
            "call": "predict_volume(model, image, samples, roi_size=ROI, overlap=OVERLAP, "
            "seed=SEED) (sw_batch_size 1, Gaussian blending, one weight sample per pass)",
            "volume": list(args.inference_volume),
            "roi": args.inference_roi,
            "overlap": INFERENCE_OVERLAP,
            "samples": [1, *args.inference_samples],
            "bayesian_model": "dwp.bayesianize(UNet3D(), include=kernel3_layers(net))",
            "timing": "one run per case, wall clock, each case in a fresh interpreter",
        },
    }
    return rows, config, render_unet3d(rows)


# -- command line --------------------------------------------------------------------------
RUNNERS = {"layers": run_layers, "kl": run_kl, "fit": run_fit, "unet3d": run_unet3d}
#: Tables of a section from its rows (to rebuild the Markdown of merged results).
RENDERERS: dict[str, Callable[[Sequence[dict[str, Any]]], str]] = {
    "layers": render_layers,
    "kl": render_kl,
    "fit": render_fit,
    "unet3d": render_unet3d,
}
TITLES = {
    "layers": "layers: training step, Bayesian 3x3x3 convs vs deterministic UNet3D",
    "kl": "kl: deep weight prior bound (forward + backward) vs deterministic training step",
    "fit": "fit: dwp.fit_kernel_vae wall time",
    "unet3d": "unet3d: training step per strategy vs random_init; sliding-window inference",
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
        help=f"timed rounds per variant (default {DEFAULT_STEPS}, {QUICK_STEPS} with --quick; "
        f"at least {MIN_REPORT_STEPS} unless --quick); the slow kl variants run "
        f"{HEAVY_REPS} ({QUICK_HEAVY_REPS} with --quick)",
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
        help=f"smoke run: {QUICK_SIZE}^3 volume, widths {QUICK_WIDTHS}, few rounds, "
        f"{QUICK_FIT_EPOCHS} fit epochs on {QUICK_FIT_KERNELS} kernels, inference on "
        f"{'x'.join(map(str, QUICK_INFERENCE_VOLUME))}; written as speed_quick.*",
    )
    parser.add_argument(
        "--replace",
        action="store_true",
        help="write only the sections run (default: keep the other sections' results "
        "already in the results file)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line, filling in the --quick-dependent settings."""
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
    args.heavy = min(args.steps, QUICK_HEAVY_REPS if args.quick else HEAVY_REPS)
    args.widths = QUICK_WIDTHS if args.quick else WIDTHS
    args.wide_widths = QUICK_WIDE_WIDTHS if args.quick else WIDE_WIDTHS
    args.fit_epochs = QUICK_FIT_EPOCHS if args.quick else FIT_EPOCHS
    args.fit_kernels = QUICK_FIT_KERNELS if args.quick else FIT_KERNELS
    args.strategy_size = QUICK_SIZE if args.quick else STRATEGY_SIZE
    args.strategy_widths = QUICK_WIDTHS if args.quick else WIDTHS
    args.inference_volume = QUICK_INFERENCE_VOLUME if args.quick else INFERENCE_VOLUME
    args.inference_roi = QUICK_INFERENCE_ROI if args.quick else INFERENCE_ROI
    args.inference_samples = QUICK_INFERENCE_SAMPLES if args.quick else INFERENCE_SAMPLES
    return args


def _run_record(args: argparse.Namespace, command: str, allocator: str) -> dict[str, Any]:
    """The settings of this run, kept per section when results are merged."""
    return {
        "command": command,
        "git_commit": report.environment()["git_commit"],
        "seed": args.seed,
        "size": args.size,
        "batch": args.batch,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "allocator": allocator,
    }


def merge_previous(
    path: Path, sections: Sequence[str], rows: list[dict[str, Any]], config: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Add the sections of an earlier results file that this run did not measure.

    Running one section (``--sections unet3d``) then updates its rows, config and tables in
    ``speed.json`` / ``speed.md`` and keeps the others' as they were measured, each with
    the command and commit that produced it (``config["section_runs"]``).

    Returns
    -------
    rows, config
        Merged, sections in :data:`SECTIONS` order; unchanged when there is nothing to keep.
    """
    try:
        previous = json.loads(path.read_text())
        old_config, old_rows = previous["config"], previous["rows"]
        old_sections = list(old_config["sections"])
    except (OSError, ValueError, KeyError, TypeError):
        return rows, config  # no (readable) earlier results: nothing to keep
    if bool(old_config.get("quick")) != bool(config["quick"]):
        return rows, config
    kept = [s for s in old_sections if s in SECTIONS and s not in sections]
    if not kept:
        return rows, config
    old_runs = old_config.get("section_runs") or {}
    merged = dict(config)
    order = [s for s in SECTIONS if s in kept or s in sections]
    merged["sections"] = order
    for key in ("section_wall_s", "other_processes_cores", "section_runs"):
        both = {**(old_config.get(key) or {}), **config[key]}
        merged[key] = {s: both[s] for s in order if s in both}
    for section in kept:
        merged[section] = old_config.get(section)
        if section not in old_runs:  # a file written before section_runs existed
            merged["section_runs"][section] = {
                "command": previous.get("command"),
                "git_commit": (previous.get("environment") or {}).get("git_commit"),
                **{
                    k: old_config.get(k)
                    for k in ("seed", "size", "batch", "steps", "threads", "allocator")
                },
            }
    by_section = {s: [r for r in old_rows if r.get("section") == s] for s in kept}
    by_section.update({s: [r for r in rows if r["section"] == s] for s in sections})
    return [r for s in order for r in by_section[s]], merged


def _markdown(rows: Sequence[dict[str, Any]], config: dict[str, Any]) -> tuple[str, str]:
    """The Markdown body (notes, one table per section, footer) and the command(s)."""
    sections = config["sections"]
    runs = config["section_runs"]
    walls, loads = config["section_wall_s"], config["other_processes_cores"]
    notes = []
    if config["quick"]:
        notes.append("**QUICK smoke run: too small and too short to compare with the targets.**")
    notes += _busy_note({s: loads.get(s) for s in sections})
    tables = [
        f"## {TITLES[s]}\n\n{RENDERERS[s]([r for r in rows if r['section'] == s])}"
        for s in sections
    ]
    # one footer line and one command per run that contributed sections
    commands: dict[str, list[str]] = {}
    for s in sections:
        commands.setdefault(runs[s]["command"], []).append(s)
    footers = []
    for members in commands.values():
        run = runs[members[0]]
        wall = ", ".join(f"{s} {walls[s]:.0f} s" for s in members if walls.get(s) is not None)
        load = ", ".join(
            f"{s} {'n/a' if loads.get(s) is None else f'{loads[s]:.2f}'}" for s in members
        )
        footers.append(
            f"{', '.join(members)}: allocator {run['allocator']}; {wall}; {run['threads']} "
            f"threads, seed {run['seed']}, commit {run['git_commit'] or 'unknown'}. Cores kept "
            f"busy by other processes, on average: {load}."
        )
    if len(commands) > 1:
        command = "\n".join(f"{c}  # {', '.join(m)}" for c, m in commands.items())
    else:
        command = next(iter(commands))
    return "\n\n".join([*notes, *tables, *footers]), command


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen sections, print the tables and write ``speed[_quick].{json,md}``.

    Sections not run keep their results from an existing ``speed[_quick].json`` in the
    output folder (see :func:`merge_previous`; ``--replace`` writes only the sections run).

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
    run = _run_record(args, command, allocator)
    config = {
        "seed": args.seed,
        "sections": list(args.sections),
        "quick": args.quick,
        "size": args.size,
        "batch": args.batch,
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
    markdown, commands = _markdown(rows, config)
    json_path, md_path = write_results(name, config, rows, markdown, args.out, command=commands)

    print(markdown)
    print(f"\ntotal {total:.1f} s; wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

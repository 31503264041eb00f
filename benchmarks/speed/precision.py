"""The ``precision`` section: training steps on ``--device``, float32 against mixed precision.

For the deterministic baseline (``random_init``) and the variational strategies
(``normal_prior``, ``dwp``) it times one step of :func:`unet3d.train.train`'s loop in float32
and under ``--amp`` (:mod:`dwp.amp`: bf16 on the CPU and on Ampere+ GPUs, fp16 with a loss
scale on older ones), exactly as the loop runs it, and the KL bound alone (forward +
backward) of the variational ones.  It reports

* the Bayesian / deterministic step ratio in each precision (target on a GPU:
  :data:`~benchmarks.speed.settings.GPU_BAYES_TARGET`),
* the KL bound's share of a step (target on a GPU: :data:`~.settings.GPU_KL_SHARE_TARGET`),
* the mixed-precision speed-up, float32 step / AMP step (target on a GPU at the paper's
  U-Net with 128^3 patches, batch 2: :data:`~.settings.GPU_AMP_TARGET`),
* peak device memory per strategy and precision (CUDA's allocator; on the CPU the tensors
  saved for the backward pass).

The targets are the GPU's; a CPU run reports the same ratios without judging them.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import dwp
from dwp.amp import guard_cpu_bf16_conv3d
from dwp.settings import validation_enabled

from ..report import markdown_table
from .settings import (
    ADAM_LR,
    GPU_AMP_SIZE,
    GPU_AMP_TARGET,
    GPU_BAYES_TARGET,
    GPU_KL_SHARE_TARGET,
    STRATEGY_N_DATA,
)
from .timing import Variant, join_tables, seeded_input, time_variants
from .unet3d import BASELINE_STRATEGY, strategy_models, strategy_step, synchronised

__all__ = ["PRECISION_STRATEGIES", "amp_precision", "render_precision", "run_precision"]

#: The deterministic baseline and the variational strategies (the others cost as it does)
PRECISION_STRATEGIES = (BASELINE_STRATEGY, "normal_prior", "dwp")


def amp_precision(device: torch.device) -> str:
    """The mixed precision ``device`` runs best: bf16 where it has it, else fp16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


def _kl_only(model: nn.Module, device: torch.device) -> tuple[Callable[[], Tensor], Callable]:
    sync = synchronised(device)

    def forward() -> Tensor:
        model.zero_grad(set_to_none=True)
        kl = dwp.kl(model)
        sync()
        return kl

    def backward(kl: Tensor) -> None:
        kl.backward()
        sync()

    return forward, backward


def _unchecked(
    forward: Callable[[], Tensor], backward: Callable[[Tensor], None]
) -> tuple[Callable[[], Tensor], Callable[[Tensor], None]]:
    """The same step with dwp's finiteness checks off (``dwp.set_validation(False)``): what
    the checks cost, which on a GPU was a synchronisation per layer before they were
    deferred (:func:`dwp.check_posteriors`)."""

    def off(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            enabled = validation_enabled()
            dwp.set_validation(False)
            try:
                return fn(*args)
            finally:
                dwp.set_validation(enabled)

        return run

    return off(forward), off(backward)


def _peak_mib(variant: Variant, device: torch.device) -> float | None:
    """Peak CUDA memory of one more step (``None`` off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    variant.backward(variant.forward())
    return torch.cuda.max_memory_allocated(device) / 2**20


def run_precision(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Time the strategies' steps in float32 and mixed precision on ``args.device``."""
    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda"):  # no mixed precision elsewhere (dwp.amp)
        raise ValueError(f"--device {device}: the precision section runs on cpu or cuda")
    precision = amp_precision(device)
    size = args.amp_size if device.type == "cpu" or args.quick else GPU_AMP_SIZE
    x = seeded_input(args.seed, args.batch, size).to(device)
    generator = torch.Generator().manual_seed(args.seed)
    target = torch.randint(0, 2, (x.shape[0], *x.shape[2:]), generator=generator).to(device)
    variants = []
    with tempfile.TemporaryDirectory(prefix="dwp-speed-") as tmp:
        built = strategy_models(args.seed, args.strategy_widths, Path(tmp))
    for name, strategy, model in built:
        if name not in PRECISION_STRATEGIES:
            continue
        model.to(device)
        guard_cpu_bf16_conv3d(model, precision, device)  # as unet3d.train does
        info = {"kind": "precision_step", "strategy": name, "bayesian": strategy.bayesian}
        for p in ("off", precision):
            variants.append(
                Variant(
                    "precision",
                    f"{name} {p}",
                    *strategy_step(strategy, model, x, target, STRATEGY_N_DATA, p),
                    args.steps,
                    baseline=f"{BASELINE_STRATEGY} {p}",
                    target_ratio=GPU_BAYES_TARGET if device.type == "cuda" else None,
                    info={**info, "precision": p},
                )
            )
        if strategy.bayesian:
            step = strategy_step(strategy, model, x, target, STRATEGY_N_DATA, precision)
            variants.append(
                Variant(
                    "precision",
                    f"{name} {precision} unchecked",
                    *_unchecked(*step),
                    args.steps,
                    baseline=f"{name} {precision}",
                    info={**info, "kind": "precision_unchecked", "precision": precision},
                )
            )
            variants.append(
                Variant(
                    "precision",
                    f"{name} kl",
                    *_kl_only(model, device),
                    args.steps,
                    baseline=f"{name} {precision}",
                    target_ratio=GPU_KL_SHARE_TARGET if device.type == "cuda" else None,
                    info={**info, "kind": "precision_kl", "precision": "off"},
                )
            )
    rows = time_variants(variants, "precision")
    peaks = {v.name: _peak_mib(v, device) for v in variants}
    for row in rows:
        row.update(device=str(device), peak_device_mib=peaks[row["variant"]])
    config = {
        "device": str(device),
        "amp": precision,
        "widths": list(args.strategy_widths),
        "input_shape": list(x.shape),
        "strategies": list(PRECISION_STRATEGIES),
        "timed": "one step of unet3d.train's loop: zero_grad, forward under dwp.amp.autocast, "
        "strategy.loss on float32 logits, GradScaler backward and step "
        f"(make_optimizer(model, 'auto', {ADAM_LR})); 'kl': dwp.kl(model) forward + backward; "
        "'unchecked': the mixed-precision step with dwp.set_validation(False)",
        "targets": {
            "bayesian_over_deterministic": GPU_BAYES_TARGET,
            "kl_share": GPU_KL_SHARE_TARGET,
            "amp_speedup": GPU_AMP_TARGET,
            "judged_on": "cuda only",
        },
    }
    return rows, config, render_precision(rows)


def render_precision(rows: list[dict[str, Any]]) -> str:
    """Step times per strategy and precision, the AMP speed-up and the KL share."""
    steps = [r for r in rows if r.get("kind") == "precision_step"]
    if not steps:
        return ""
    medians = {r["variant"]: r["median_s"] for r in rows}
    amp = next(r["precision"] for r in steps if r["precision"] != "off")
    device = steps[0].get("device", "cpu")
    on_gpu = device.startswith("cuda")
    table = []
    for name in dict.fromkeys(r["strategy"] for r in steps):
        full, mixed = (
            next(r for r in steps if r["variant"] == f"{name} {p}") for p in ("off", amp)
        )
        kl = medians.get(f"{name} kl")
        unchecked = medians.get(f"{name} {amp} unchecked")
        speedup = full["median_s"] / mixed["median_s"]
        peak = [r.get("peak_device_mib") for r in (full, mixed)]
        table.append(
            [
                name,
                f"{full['median_s']:.4f}",
                f"{mixed['median_s']:.4f}",
                f"{full['ratio']:.2f}x / {mixed['ratio']:.2f}x",
                f"{speedup:.2f}x" + (" (met)" if on_gpu and speedup >= GPU_AMP_TARGET else ""),
                "-" if kl is None else f"{kl / mixed['median_s']:.1%}",
                "-" if unchecked is None else f"{1 - unchecked / mixed['median_s']:.1%}",
                " / ".join("-" if p is None else f"{p:.0f}" for p in peak),
                f"{full['saved_for_backward_mib']:.0f} / {mixed['saved_for_backward_mib']:.0f}",
            ]
        )
    header = [
        "strategy", "float32 step (s)", f"{amp} step (s)",
        f"vs {BASELINE_STRATEGY} (float32 / {amp})", f"{amp} speed-up",
        f"KL share of a {amp} step", f"NaN checks' share of a {amp} step",
        f"peak device MiB (float32 / {amp})",
        "saved for backward MiB (float32 / amp)",
    ]  # fmt: skip
    targets = (
        f"Targets on a GPU: Bayesian / deterministic <= {GPU_BAYES_TARGET:.2f}x, KL share "
        f"<= {GPU_KL_SHARE_TARGET:.0%}, {amp} speed-up >= {GPU_AMP_TARGET:.1f}x (paper U-Net, "
        f"{GPU_AMP_SIZE}^3, batch 2)."
    )
    if not on_gpu:
        targets += f" This run is on {device}: the ratios are reported, not judged."
    return join_tables(
        steps, f"Device `{device}`, mixed precision {amp}.", markdown_table(header, table), targets
    )

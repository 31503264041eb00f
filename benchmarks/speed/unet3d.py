"""The ``unet3d`` section: the unet3d application's training strategies and inference.

One step of :func:`unet3d.train.train`'s loop for every registered strategy, as a ratio to
``random_init`` (interleaved as in the other sections), then sliding-window inference (see
:mod:`benchmarks.speed.inference`).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import dwp
from dwp import amp
from dwp.io import save_torch_file
from unet3d import UNet3D
from unet3d.strategies import STRATEGIES, ModelSpec, Strategy, get_strategy

from ..report import markdown_table
from .inference import inference_rows
from .settings import ADAM_LR, INFERENCE_OVERLAP, STRATEGY_N_DATA, WARMUP_STEPS
from .timing import Variant, noisy_note, phase_cells, seeded_input, time_variants

__all__ = [
    "BASELINE_STRATEGY",
    "render_unet3d",
    "run_unet3d",
    "strategy_models",
    "strategy_step",
    "strategy_variants",
    "synchronised",
]

BASELINE_STRATEGY = "random_init"


def strategy_models(
    seed: int, widths: Sequence[int], source_dir: Path
) -> list[tuple[str, Strategy, nn.Module]]:
    """Every registered strategy's network, built the way :func:`unet3d.train.train` does."""
    torch.manual_seed(seed)
    spec = ModelSpec(widths=tuple(widths))
    # pretrained needs a source checkpoint: any UNet3D of the same widths (the step's cost
    # does not depend on the weights' values)
    source = save_torch_file(UNet3D(widths=widths).state_dict(), source_dir / "source.pt")
    # an untrained default MLP kernel VAE, as in the kl section: the bound's cost does not
    # depend on the VAE's weights either
    prior = dwp.DeepWeightPrior({"all": dwp.KernelVAE((3, 3, 3))})
    options: dict[str, dict[str, Any]] = {
        "random_init": {},
        "pretrained": {"source": source},
        "pretrained_frozen": {"source": source},
        "l2_sp": {"source": source},
        "normal_prior": {},
        "dwp": {"prior_path": prior},
        "prior": {"prior_path": prior},
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


def synchronised(device: torch.device) -> Callable[[], None]:
    """Wait for ``device``'s queued kernels (CUDA runs asynchronously: a timer read
    without it measures the launch, not the work); a no-op elsewhere."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def strategy_step(
    strategy: Strategy,
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    n_data: int,
    precision: str = "off",
) -> tuple[Callable[[], Tensor], Callable[[Tensor], None]]:
    """Forward/backward callables of one step of :func:`unet3d.train.train`'s loop.

    The strategy's own optimiser, as the loop builds it (``optimizer="auto"``: Adam for the
    deterministic strategies, Adam on the means and natural-gradient steps on the scales
    for the variational ones; frozen blocks left out); the strategy's loss (the paper's
    loss, or the negative ELBO with the KL of every Bayesian layer) on float32 logits of a
    forward pass in ``precision`` (:mod:`dwp.amp`), and the loop's loss scaler.  Each
    phase ends when ``x``'s device has finished it.
    """
    device = x.device
    optimizer = strategy.make_optimizer(model, "auto", ADAM_LR)
    scaler, sync, steps = amp.grad_scaler(precision, device), synchronised(device), [0]

    def forward() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        with amp.autocast(precision, device):
            logits = model(x)
        loss, _ = strategy.loss(model, logits.float(), target, n_data, x.shape[0], steps[0])
        sync()
        return loss

    def backward(loss: Tensor) -> None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # optimizer.step() unless fp16 gradients overflowed
        scaler.update()
        steps[0] += 1
        sync()

    return forward, backward


def strategy_variants(
    seed: int, widths: Sequence[int], x: Tensor, reps: int, source_dir: Path
) -> list[Variant]:
    """One training-step variant per strategy, each timed against ``random_init``."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 2, (x.shape[0], *x.shape[2:]), generator=generator)
    variants = []
    for name, strategy, model in strategy_models(seed, widths, source_dir):
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


def render_unet3d(rows: Sequence[dict[str, Any]]) -> str:
    """Training steps per strategy (ratio to random_init) and the inference table."""
    steps = [r for r in rows if r.get("kind") == "train_step"]
    infer = [r for r in rows if r.get("kind") == "inference"]
    parts = noisy_note(steps)
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
                        *phase_cells(r),
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
    x = seeded_input(args.seed, args.batch, args.strategy_size)
    # a scratch folder for the pretrained strategies' source checkpoint
    with tempfile.TemporaryDirectory(prefix="dwp-speed-") as tmp:
        variants = strategy_variants(args.seed, args.strategy_widths, x, args.steps, Path(tmp))
        rows = time_variants(variants, "unet3d")
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
        f"(n_data {STRATEGY_N_DATA}), backward, strategy.make_optimizer(model, 'auto', "
        f"{ADAM_LR}).step()",
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

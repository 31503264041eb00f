"""The ``layers`` section: one training step of the reference UNet3D, deterministic and with
its 3x3x3 convs Bayesian under each estimator, as a ratio to the deterministic step.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dwp
from unet3d import UNet3D, kernel3_layers

from ..report import markdown_table
from .settings import LAYER_TARGETS, SGD_LR, WARMUP_STEPS
from .timing import Variant, join_tables, met_cell, phase_cells, seeded_input, time_variants

__all__ = ["DETERMINISTIC", "layer_variants", "render_layers", "run_layers", "training_step"]

DETERMINISTIC = "deterministic"


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
                met_cell(r),
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
        [[r["variant"], *phase_cells(r), f"{r['parameters']:,}"] for r in rows],
    )
    return join_tables(rows, headline, "Breakdown:", breakdown)


def run_layers(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Time the layer estimators; return the rows, the section's config and its tables."""
    x = seeded_input(args.seed, args.batch, args.size)
    variants = layer_variants(args.seed, args.widths, x, args.steps)
    rows = time_variants(variants, "layers")
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

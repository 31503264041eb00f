"""The cost of each optimiser path: one training step of the variational U-Net, timed with
the speed suite's interleaved harness (:mod:`benchmarks.speed.timing`) against the same
step under plain Adam, in the same run, on the runs' device and in their precision (the
transfer preset's ``device`` and ``amp``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import dwp
from dwp import amp
from unet3d.losses import elbo_data_terms
from unet3d.model import UNet3D
from unet3d.strategies import ModelSpec, get_strategy

from ..speed.timing import Variant, run_interleaved, summarise
from ..speed.unet3d import synchronised
from ..transfer import Preset as TransferPreset
from .config import PATHS, Preset
from .runs import scaled_step

__all__ = ["STEP_TARGET", "time_paths"]

#: Largest acceptable step time of a path, as a multiple of plain Adam's (the issue's 1.2x).
STEP_TARGET = 1.2
BASELINE = "adam"


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    beta: float,
    precision: str = "off",
) -> tuple[Callable[[], Tensor], Callable[[Tensor], None]]:
    """One step of the ELBO (N / B = 1): forward (in ``precision``, :mod:`dwp.amp`), loss,
    backward, optimiser step (under fp16's loss scale); IVON's weight sample is drawn inside
    the timed forward and put back after the backward.  Each phase ends when ``x``'s device
    has finished it (CUDA runs asynchronously)."""
    sampling: list[contextlib.AbstractContextManager] = []
    scaler, sync = amp.grad_scaler(precision, x.device), synchronised(x.device)

    def forward() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        context = dwp.optim.sampling_step(optimizer)
        context.__enter__()
        sampling.append(context)
        with amp.autocast(precision, x.device):  # the network alone, as in training
            logits = model(x)
        data = elbo_data_terms(logits.float(), y).total
        loss = dwp.elbo(data, model, n_data=1, batch_size=1, beta=beta).loss
        sync()
        return loss

    def backward(loss: Tensor) -> None:
        scaler.scale(loss).backward()
        sampling.pop().__exit__(None, None, None)
        scaled_step(optimizer, scaler)
        sync()

    return forward, backward


def time_paths(preset: Preset, transfer: TransferPreset, seed: int) -> list[dict[str, Any]]:
    """One row per path (and plain Adam on the deterministic U-Net, for scale): median
    step time and its ratio to plain Adam on the same variational U-Net, on
    ``transfer.device`` in ``transfer.amp``."""
    device, precision = torch.device(transfer.device), transfer.amp
    torch.manual_seed(seed)
    # drawn on the CPU: the same numbers on every device
    x = torch.randn(2, 1, *transfer.crop).to(device)
    y = (torch.rand(2, *transfer.crop) > 0.9).long().to(device)
    strategy = get_strategy("normal_prior", beta=preset.beta)
    variants = []
    names = [BASELINE, *(p for p in preset.paths if p != BASELINE)]
    for name in names:
        torch.manual_seed(seed)
        if name == "ivon":
            model = UNet3D(1, 2, transfer.widths).train().to(device)
            optimizer = dwp.optim.IVON(
                model.parameters(), lr=preset.ivon_lr, ess=1.0, beta2=preset.ivon_beta2
            )
        else:
            path = PATHS[name]
            model = strategy.build_model(ModelSpec(widths=transfer.widths)).train().to(device)
            scale_lr = transfer.lr * (path.scale_lr_factor or 0.1)
            optimizer = dwp.optim.build_optimizer(
                path.optimizer,
                model,
                transfer.lr,
                kl_weight=preset.beta,
                scale_rate=path.scale_rate,
                scale_lr=scale_lr,
            )
        amp.guard_cpu_bf16_conv3d(model, precision, device)  # a torch defect, refused
        info = {
            "path": name,
            "optimizer": type(optimizer).__name__,
            "input_shape": list(x.shape),
            "device": str(device),
            "amp": precision,
        }
        variants.append(
            Variant(
                "optimisers",
                name,
                *_step(model, optimizer, x, y, preset.beta, precision),
                preset.timing_rounds,
                baseline=BASELINE,
                target_ratio=STEP_TARGET,
                info=info,
            )
        )
    run_interleaved(variants, "optimisers")
    return summarise(variants, {v.name: float("nan") for v in variants})

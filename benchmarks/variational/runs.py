"""One run: a variational U-Net trained on one split by one optimiser path, then measured.

What is measured, beyond the transfer benchmark's test Dice and voxel uncertainty
(:func:`benchmarks.transfer.cells.evaluate_model`): how far the posterior log-scales
moved from their initial value, and the final negative ELBO on the training volumes
(``E_q[data term] + beta * KL``, the objective every path minimises; lower is better).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

import dwp
from dwp import amp
from dwp.io import write_json
from unet3d import devices
from unet3d.checkpoint import load_source, read_state_dict
from unet3d.data import collate
from unet3d.losses import elbo_data_terms, paper_loss
from unet3d.model import UNet3D
from unet3d.strategies import ModelSpec, get_strategy
from unet3d.train import train

from ..stages import stage_folder
from ..transfer import Preset as TransferPreset
from ..transfer.cells import Datasets, evaluate_model, split_indices
from ..transfer.sources import train_config
from .config import PATHS, Preset

__all__ = ["Run", "run", "scaled_step"]


@dataclass(frozen=True)
class Run:
    """One cell of the comparison: ``method`` (``normal_prior``, ``dwp`` or the
    ``pretrained`` baseline) trained by ``path`` on ``split``."""

    method: str
    path: str
    split: int

    def key(self, preset: Preset, transfer: TransferPreset, stages: dict[str, Any]) -> dict:
        """What the run's result depends on (its folder is named by its hash)."""
        return {
            # bump when the runs' code changes their results (2: the per-voxel Dice weight)
            "version": 2,
            "run": [self.method, self.path, self.split],
            "preset": {k: v for k, v in preset.__dict__.items() if k not in ("splits", "paths")},
            # where a run computes is in no key; mixed precision only when on, so the keys
            # of float32 runs are those from before the two settings existed
            "transfer": {k: v for k, v in transfer.__dict__.items() if k not in ("device", "amp")}
            | ({"amp": transfer.amp} if transfer.amp != "off" else {}),
            "stages": stages,
        }


def _epochs(transfer: TransferPreset, size: int) -> tuple[int, int]:
    """Epochs and epochs between validations: the transfer benchmark's step budget."""
    per_epoch = math.ceil(size / 2)
    epochs = math.ceil(transfer.steps / per_epoch)
    return epochs, max(1, round(transfer.val_every_steps / per_epoch))


def _log_scales(model: nn.Module) -> Tensor:
    return torch.cat(
        [layer.weight_log_sigma.detach().flatten() for _, layer in dwp.bayesian_layers(model)]
    )


def scale_movement(start: Tensor, end: Tensor) -> dict[str, float]:
    """How far the log-scales moved: mean |change|, the share that moved by more than 0.5
    (a factor 1.65 in sigma), and the final mean and 5 / 95 % quantiles."""
    change = (end - start).abs()
    sample = end[torch.randperm(len(end), generator=torch.Generator().manual_seed(0))[:100_000]]
    return {
        "log_sigma_change": float(change.mean()),
        "moved_fraction": float((change > 0.5).double().mean()),
        "log_sigma_start": float(start.mean()),
        "log_sigma_mean": float(end.mean()),
        "log_sigma_q05": float(sample.quantile(0.05)),
        "log_sigma_q95": float(sample.quantile(0.95)),
    }


@torch.no_grad()
def negative_elbo(
    model: nn.Module, volumes: Subset, beta: float, samples: int, dice_weight: float
) -> dict:
    """``E_q[data term] + beta * KL`` on the training volumes (the data term summed over
    them: every path's objective at ``N / B = 1``), averaged over ``samples`` draws."""
    loader = DataLoader(volumes, batch_size=len(volumes), collate_fn=collate)
    batch = next(iter(loader))
    data, kls = [], []
    model.eval()
    with dwp.sampling(True, model):
        for _ in range(samples):
            terms = elbo_data_terms(model(batch["image"]), batch["label"], dice_weight=dice_weight)
            data.append(float(terms.total))
            kls.append(float(dwp.kl(model)))
    data_term, kl = sum(data) / samples, sum(kls) / samples
    return {"neg_elbo": data_term + beta * kl, "data_term": data_term, "kl": kl}


def _ivon_groups(model: nn.Module, ess: float, weight_decay: float) -> list[dict]:
    """One group per parameter, its initial curvature set so that IVON starts at the scales
    the other paths start at (dwp's fan-in rule), for a fair comparison."""
    groups = []
    for p in model.parameters():
        fan_in = p.shape[1] * math.prod(p.shape[2:]) if p.dim() > 1 else p.numel()
        sigma = 0.1 * math.sqrt(2.0 / max(fan_in, 1))
        groups.append(
            {"params": [p], "hess_init": max(1.0 / (ess * sigma**2) - weight_decay, 1e-8)}
        )
    return groups


def scaled_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """``optimizer``'s step on gradients scaled by ``scaler`` (:func:`dwp.amp.grad_scaler`:
    fp16's loss scale, a pass-through otherwise), then the scale's update.

    The scaler skips the step whose fp16 gradients overflowed; IVON would then keep the
    weight sample of that step, and its next sample would raise.  So for IVON the step is
    taken without the overflowed gradients instead: IVON moves no parameter that has no
    gradient, and the step drops its sample.
    """
    if not (scaler.is_enabled() and isinstance(optimizer, dwp.optim.IVON)):
        scaler.step(optimizer)
        scaler.update()
        return
    scaler.unscale_(optimizer)  # records the overflow that update() lowers the scale for
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not all(bool(torch.isfinite(grad).all()) for grad in grads):
        optimizer.zero_grad(set_to_none=True)
    optimizer.step()
    scaler.update()


def _train_ivon(
    preset: Preset,
    transfer: TransferPreset,
    datasets: Datasets,
    idx: list[int],
    source: str,
    seed: int,
) -> tuple[nn.Module, Tensor, int]:
    """IVON on the plain U-Net from the source network, on the same objective as the others:
    ``ess * loss = data term / beta`` with ``ess = N``, prior N(0, 1) (weight decay
    ``1 / N``); the same step budget and validation schedule, the best validated means.

    It trains on ``transfer.device`` with the forward passes in ``transfer.amp``, as
    :func:`unet3d.train.train` trains the other paths; the initial log-scales and the
    returned posterior are on the CPU, where every path is evaluated."""
    epochs, val_every = _epochs(transfer, len(idx))
    device, precision = torch.device(transfer.device), transfer.amp
    torch.manual_seed(seed)
    # built on the CPU, so that the initial weights are the same on every device; moved
    # before the optimiser holds the parameters
    model = load_source(UNet3D(1, 2, transfer.widths), source).train().to(device)
    guards = amp.guard_cpu_bf16_conv3d(model, precision, device)  # a torch defect, refused
    scaler = amp.grad_scaler(precision, device)
    n = len(idx)
    groups = _ivon_groups(model, n, 1.0 / n)
    optimizer = dwp.optim.IVON(
        groups, lr=preset.ivon_lr, ess=n, weight_decay=1.0 / n, beta2=preset.ivon_beta2
    )
    start = _log_scales(dwp.optim.to_bayesian(model, optimizer)).cpu()
    loader = DataLoader(
        Subset(datasets.pool, idx),
        batch_size=2,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    val = DataLoader(datasets.val, batch_size=2, collate_fn=collate)
    best, best_state, steps = math.inf, None, 0
    torch.manual_seed(seed + 1)
    for epoch in range(epochs):
        for batch in loader:
            image, label = devices.batch_to(batch, device)
            optimizer.zero_grad()
            with optimizer.sampled_params(train=True):
                with amp.autocast(precision, device):  # the network alone (dwp.amp)
                    logits = model(image)
                total = elbo_data_terms(logits.float(), label, dice_weight=preset.dice_weight).total
                scaler.scale(total / (preset.beta * image.shape[0])).backward()
            scaled_step(optimizer, scaler)
            steps += 1
        if (epoch + 1) % val_every == 0 or epoch + 1 == epochs:
            model.eval()
            with torch.no_grad():  # float32, as unet3d's validation
                loss = sum(
                    float(paper_loss()(model(image), label))
                    for image, label in (devices.batch_to(b, device) for b in val)
                )
            model.train()
            if loss < best:
                best = loss
                best_state = dwp.optim.to_bayesian(model, optimizer).state_dict()
    for guard in guards:
        guard.remove()
    bayes = dwp.optim.to_bayesian(model, optimizer)
    bayes.load_state_dict(best_state)
    return bayes.cpu(), start, steps


def run(
    job: Run,
    preset: Preset,
    transfer: TransferPreset,
    stages: dict[str, Any],
    datasets: Datasets,
    work: Path,
    seed: int,
) -> dict[str, Any]:
    """Train and measure one run (read back when its ``result.json`` exists)."""
    folder = stage_folder(
        work / "variational", f"{job.method}-{job.path}", job.key(preset, transfer, stages)
    )
    folder = folder / f"split{job.split}"
    result_file = folder / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    idx = split_indices(transfer.pool, preset.size, job.split, seed)
    source = stages["sources"]["nets"][0]["best"]
    run_seed = seed * 1000 + 100 * job.split + preset.size
    options: dict[str, Any] = {"source": source}
    if job.method != "pretrained":
        options.update(beta=preset.beta, init=preset.init, dice_weight=preset.dice_weight)
    if job.method == "dwp":
        options["prior_path"] = stages["prior"]["prior"]
    started = time.perf_counter()
    if job.path == "ivon":
        model, start, steps = _train_ivon(preset, transfer, datasets, idx, source, run_seed)
    else:
        path = PATHS.get(job.path)
        optimizer, rate = ("auto", 0.1) if path is None else (path.optimizer, path.scale_rate)
        if path is not None and path.scale_lr_factor is not None:
            options["scale_lr"] = transfer.lr * path.scale_lr_factor
        epochs, val_every = _epochs(transfer, preset.size)
        config = train_config(
            transfer,
            strategy=job.method,
            strategy_options=options,
            out_dir=folder,
            epochs=epochs,
            val_every=val_every,
            lr_patience=transfer.patience,
            seed=run_seed,
            optimizer=optimizer,
            scale_rate=rate,
        )
        result = train(config, Subset(datasets.pool, idx), datasets.val, resume=True)
        steps = result.history[-1]["step"]
        strategy = get_strategy(job.method, **options)
        torch.manual_seed(run_seed)  # the initial scales, as train() built them
        model = strategy.build_model(ModelSpec(widths=transfer.widths))
        start = _log_scales(model) if strategy.bayesian else None
        model.load_state_dict(read_state_dict(folder / "best.pt"))
        (folder / "last.pt").unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    bayesian = bool(dwp.bayesian_layers(model))
    record: dict[str, Any] = {
        "method": job.method,
        "path": job.path,
        "split": job.split,
        "steps": steps,
        "train_seconds": seconds,
    }
    if bayesian:
        record.update(scale_movement(start, _log_scales(model)))
        record.update(
            negative_elbo(
                model,
                Subset(datasets.pool, idx),
                preset.beta,
                preset.elbo_samples,
                preset.dice_weight,
            )
        )
    evaluation = transfer.replace(eval_samples=preset.eval_samples)
    scores = evaluate_model(model, datasets.test, evaluation, bayesian, seed, tta=not bayesian)
    record.update(
        dice=scores["dice_mean"], iou=scores["iou_mean"], uncertainty=scores["uncertainty"]
    )
    write_json(result_file, record, default=str)
    return record

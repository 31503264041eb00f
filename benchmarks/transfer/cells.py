"""Stage 4: the grid of target runs, one cell (method, train size, split) at a time, on
nested training subsets shared by every method (:func:`split_indices`); each run is scored
on the test set: Dice, IoU, HD95 and the per-voxel uncertainty (:func:`evaluate_model`)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

import dwp
from dwp.io import write_json
from unet3d.checkpoint import read_state_dict
from unet3d.config import TrainConfig
from unet3d.data import SegmentationDataset
from unet3d.inference import VolumePrediction, predict_volume, predict_volume_tta
from unet3d.metrics import evaluate, voxel_uncertainty
from unet3d.strategies import ModelSpec, get_strategy
from unet3d.train import train

from .config import BAYESIAN, LR_FROM, LR_OF, STRATEGY_OF, Preset
from .data import Data
from .sources import train_config


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    method: str
    size: int
    split: int

    def folder(self) -> str:
        return f"n{self.size}/split{self.split}"


def grid(preset: Preset) -> list[Cell]:
    """Every cell, smallest training sets first (their runs are the cheapest)."""
    return [
        Cell(m, n, s) for n in preset.sizes for s in range(preset.splits) for m in preset.methods
    ]


def parse_only(text: str | None) -> dict[str, set[str]]:
    """``"method=dwp,size=5+10,split=0"`` -> ``{"method": {"dwp"}, "size": {"5", "10"}, ...}``."""
    if not text:
        return {}
    out: dict[str, set[str]] = {}
    for part in text.split(","):
        name, sep, values = part.partition("=")
        if not sep or name not in ("method", "size", "split") or not values:
            raise ValueError(
                f"--only: expected method=..,size=..,split=.. (values joined by '+'), got {part!r}"
            )
        out[name] = set(values.split("+"))
    return out


def selected(cell: Cell, only: Mapping[str, set[str]]) -> bool:
    """Whether ``cell`` is one of the cells :func:`parse_only`'s ``only`` selects."""
    values = {"method": cell.method, "size": str(cell.size), "split": str(cell.split)}
    return all(values[k] in allowed for k, allowed in only.items())


def split_indices(pool: int, size: int, split: int, seed: int) -> list[int]:
    """Pool indices of the training subset: the first ``size`` of split ``split``'s
    permutation, so the subsets of one split are nested and every method gets the same."""
    order = np.random.default_rng([seed, split]).permutation(pool)
    return sorted(int(i) for i in order[:size])


def _epochs(preset: Preset, size: int) -> int:
    if preset.steps <= 0:
        return preset.epochs
    return math.ceil(preset.steps / math.ceil(size / 2))


def _val_every(preset: Preset, size: int) -> int:
    """Epochs between validations: about ``val_every_steps`` steps (batch 2)."""
    if preset.val_every_steps <= 0:
        return 1
    return max(1, round(preset.val_every_steps / math.ceil(size / 2)))


class Datasets:
    """The target volumes, loaded once per process and shared by every cell."""

    def __init__(self, preset: Preset, data: Data) -> None:
        options = {"normalise": "minmax", "binarise": True, "size": preset.crop, "cache": True}
        self.pool = SegmentationDataset(data.pool, **options)
        self.val = SegmentationDataset(data.val, **options)
        self.test = SegmentationDataset(data.test, **options)


#: The spatial axis test-time augmentation mirrors: 0, left-right on the cohorts' MNI grid,
#: where a brain is nearly symmetric.  The other axes would show the nets upside-down or
#: back-to-front brains, which they never saw in training (no flip augmentation).
TTA_FLIPS = (0,)


def finite_means(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per key of ``rows[0]``, the mean of its finite values over the rows (``nan`` where
    none is: e.g. an AUROC with no wrong voxel, a region with no foreground)."""
    means = {}
    for key in rows[0]:
        values = [r[key] for r in rows if math.isfinite(r[key])]
        means[key] = float(np.mean(values)) if values else math.nan
    return means


#: The uncertainty scores kept per test volume in a run's record.
PER_VOLUME_UNCERTAINTY = ("ece_roi", "nll_roi", "auroc_entropy_roi", "auroc_mi_roi")


def strategy_name(method: str) -> str:
    """The :mod:`unet3d.strategies` strategy that trains ``method``."""
    return STRATEGY_OF.get(method, method)


def method_lr(preset: Preset, method: str) -> float:
    """``method``'s learning rate: its own field (:data:`~.config.LR_OF`), that of the
    method it shares it with (:data:`~.config.LR_FROM`), or ``lr``."""
    owner = LR_FROM.get(method, method)
    return getattr(preset, LR_OF[owner]) if owner in LR_OF else preset.lr


def evaluate_model(
    model: torch.nn.Module,
    test: SegmentationDataset,
    preset: Preset,
    bayesian: bool,
    seed: int,
    tta: bool = False,
) -> dict[str, Any]:
    """Dice, IoU and HD95 (mm) of ``model`` on every test volume (whole-volume prediction),
    and ``"uncertainty"``: the means over the volumes of
    :func:`unet3d.metrics.voxel_uncertainty`.

    The uncertainty is scored on the test prediction, except for a Bayesian model with
    ``eval_samples`` 0 (Dice of the posterior means): on ``uncertainty_samples`` posterior
    samples then, for a mutual information.  ``tta``: also with test-time augmentation
    (``"tta"``, :data:`TTA_FLIPS`).  ``"passes"`` says how many passes were averaged;
    ``"uncertainty_seconds"`` is the time the uncertainty added (its predictions and
    scores).
    """
    predictions, labels = [], []
    rows: dict[str, list[dict[str, float]]] = {"model": [], "tta": []}
    samples = preset.eval_samples if bayesian else 0
    # posterior samples of the predictive that is scored for uncertainty
    u_samples = samples or (preset.uncertainty_samples if bayesian else 0)
    passes = {"model": max(u_samples, 1), "tta": 2 ** len(TTA_FLIPS)}
    seconds = 0.0

    def predict(image: torch.Tensor, n: int, volume_seed: int) -> VolumePrediction:
        return predict_volume(
            model, image, max(n, 1), roi_size=preset.crop, sample=n > 0, seed=volume_seed
        )

    for i in range(len(test)):
        item = test[i]
        out = predict(item["image"], samples, seed + i)
        predictions.append(out.mask)
        labels.append(item["label"])
        started = time.perf_counter()
        if u_samples != samples:
            out = predict(item["image"], u_samples, seed + i)
        rows["model"].append(voxel_uncertainty(out, item["label"]))
        if tta:
            out = predict_volume_tta(model, item["image"], TTA_FLIPS, roi_size=preset.crop)
            rows["tta"].append(voxel_uncertainty(out, item["label"]))
        seconds += time.perf_counter() - started
    scores = evaluate(predictions, labels, spacing=(preset.resolution,) * 3)
    scores["uncertainty"] = {
        name: {"passes": passes[name], **finite_means(values)}
        for name, values in rows.items()
        if values
    }
    scores["uncertainty_seconds"] = seconds
    # per test volume, for the paired statistics of the report (the means above are theirs)
    scores["uncertainty_per_volume"] = {
        key: [row[key] for row in rows["model"]] for key in PER_VOLUME_UNCERTAINTY
    }
    return scores


def posterior_summary(model: torch.nn.Module, initial: torch.nn.Module) -> dict[str, float]:
    """Whether the posterior learned its scales: over every Bayesian weight of ``model``,
    the median posterior sigma, the median of ``|mean| / sigma`` and the median change of
    log-sigma from ``initial`` (the same network before training)."""

    def scales(net: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        posteriors = [layer.weight_posterior for _, layer in dwp.bayesian_layers(net)]
        loc = torch.cat([q.loc.detach().flatten() for q in posteriors])
        return loc, torch.cat([q.scale.detach().flatten() for q in posteriors])

    loc, sigma = scales(model)
    _, sigma0 = scales(initial)
    return {
        "sigma_median": float(sigma.median()),
        "snr_median": float((loc.abs() / sigma).median()),
        "log_sigma_change_median": float((sigma.log() - sigma0.log()).median()),
    }


def kl_share(epoch: Mapping[str, float]) -> float | None:
    """``beta * KL / (data term + beta * KL)`` of a training epoch's mean terms: how much
    of the objective the prior is (``None`` for a deterministic run)."""
    if "train_kl" not in epoch:
        return None
    weighted = epoch["train_beta"] * epoch["train_kl"]
    return float(weighted / (epoch["train_data_term"] + weighted))


def run_cell(
    cell: Cell,
    preset: Preset,
    data: Data,
    datasets: Datasets,
    folder: Path,
    options: dict[str, Any],
    seed: int,
    tensorboard: Path | None = None,
    *,
    evaluate: bool = True,
) -> dict[str, Any]:
    """Train one cell (resuming an interrupted run) and score it on the test set;
    ``tensorboard``: the run's TensorBoard folder (not in the record, the config's
    :meth:`~unet3d.config.TrainConfig.as_dict` leaves it out).

    ``evaluate=False`` (a tuning candidate) trains only: ``training.json`` then holds what
    the selection reads (the validation scores) and the record is that alone.  The test
    set is scored only for the candidate that is chosen, when its grid cell runs: it
    finds the training finished and evaluates ``best.pt``.
    """
    result_file = folder / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    train_idx = split_indices(preset.pool, cell.size, cell.split, seed)
    config = train_config(
        preset,
        strategy=strategy_name(cell.method),
        strategy_options=options,
        lr=method_lr(preset, cell.method),
        out_dir=folder,
        epochs=_epochs(preset, cell.size),
        val_every=_val_every(preset, cell.size),
        lr_patience=preset.patience,
        out_bias=preset.out_bias,
        seed=seed * 1000 + 100 * cell.split + cell.size,
        tensorboard=tensorboard,
    )
    trained = _trained(config, datasets, train_idx, folder)
    if not evaluate:
        return trained
    strategy = get_strategy(strategy_name(cell.method), **options)
    model = strategy.build_model(ModelSpec(widths=preset.widths, out_bias=preset.out_bias))
    model.load_state_dict(read_state_dict(folder / "best.pt"))
    started = time.perf_counter()
    tta = cell.method not in BAYESIAN and cell.size in preset.tta_sizes
    scores = evaluate_model(model, datasets.test, preset, strategy.bayesian, seed, tta)
    eval_seconds = time.perf_counter() - started
    best = trained["best"]
    posterior = None
    if strategy.bayesian:
        torch.manual_seed(config.seed)  # the network the run started from
        initial = strategy.build_model(ModelSpec(widths=preset.widths, out_bias=preset.out_bias))
        posterior = {**posterior_summary(model, initial), "kl_share": kl_share(best)}
    record = {
        "method": cell.method,
        "size": cell.size,
        "split": cell.split,
        "train_ids": [data.pool[i].id for i in train_idx],
        "dice": scores["dice_mean"],
        "iou": scores["iou_mean"],
        "hd95_mm": scores["hd95_mean"],
        "val_dice": best["val_dice"],
        "val_loss": best["val_loss"],
        **{k: trained[k] for k in ("best_epoch", "epochs", "stop_reason", "train_seconds")},
        "eval_seconds": eval_seconds,
        "test": {
            **{k: scores[k] for k in ("dice", "iou", "hd95")},
            **scores["uncertainty_per_volume"],
        },
        "uncertainty": scores["uncertainty"],
        "uncertainty_seconds": scores["uncertainty_seconds"],
        "posterior": posterior,
        "strategy": strategy.describe(),
        "config": config.as_dict(),
    }
    write_json(result_file, record, default=str)
    return record


def _trained(
    config: TrainConfig, datasets: Datasets, train_idx: list[int], folder: Path
) -> dict[str, Any]:
    """Train the run (resuming an interrupted one) unless ``training.json`` says it is
    done; that file's content: the best epoch's record (``val_dice``, ``val_loss``, ...),
    ``best_epoch``, ``epochs``, ``stop_reason`` and ``train_seconds``."""
    summary_file = folder / "training.json"
    if summary_file.exists():
        return json.loads(summary_file.read_text())
    started = time.perf_counter()
    result = train(config, Subset(datasets.pool, train_idx), datasets.val, resume=True)
    best = result.history[result.best_epoch]
    summary = {
        "best": best,
        "val_dice": best["val_dice"],  # what the selection reads
        "best_epoch": result.best_epoch,
        "epochs": len(result.history),
        "stop_reason": result.stop_reason,
        "train_seconds": time.perf_counter() - started,
    }
    write_json(summary_file, summary, default=str)
    # The run's checkpoints are large and no longer needed (``best.pt`` stays).
    (folder / "last.pt").unlink(missing_ok=True)
    return summary

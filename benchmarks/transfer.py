"""The main job: the Kuzina et al. (2019) transfer comparison, end to end.

DWP (a variational U-Net with a deep weight prior learned on source kernels) against
pretrain + fine-tune (PR), pretrain with a frozen middle (PRf), random init (RI) and the
Bayesian control with an N(0, 1) prior, for several target training-set sizes and splits::

    python -m benchmarks.transfer --seed 0                      # the quick preset
    python -m benchmarks.transfer --preset ci --seed 0          # smoke run (a minute)
    python -m benchmarks.transfer --only method=dwp,size=5,split=0
    python -m benchmarks.transfer --merge machineA/work machineB/work

Stages, each a folder under ``--work-dir`` named by a hash of everything it depends on
(so a changed setting never reuses a stale result, and an unchanged one is never redone):

1. ``data/``: the offline cohorts (``ms_source`` FLAIR-like MS lesions as the source,
   ``tumour_target`` T2-like whole tumour as the target), or the user's Decathlon folders
   (``--source-data``, ``--target-data``; the target's test images need ``labelsTs/``);
2. ``source-<hash>/``: source U-Nets trained by :func:`unet3d.train.train` with cyclical
   restarts; every cycle's final network is one kernel set;
3. ``prior-<hash>/``: the kernel bank (7 resolution groups), one kernel VAE per group
   (:meth:`dwp.DeepWeightPrior.fit`), the prior file, its fit report and figure;
4. ``runs/<method>-<hash>/n<size>/split<k>/``: one training run per grid cell, resumable
   (``last.pt``), finished when ``result.json`` exists.

The training subsets are nested (split ``k`` draws one permutation of the target pool and
size ``n`` takes its first ``n`` subjects) and shared by every method; validation (learning
rate schedule, best checkpoint) uses a fixed set of target subjects outside the pool, the
test set is never looked at during training or selection.

The report (``--out``, default ``benchmarks/results``): ``transfer[_<preset>].md`` with the
paper-format tables (Dice and IoU, mean (std) over splits), paired differences DWP minus
each baseline with a paired t-test across splits, the source and prior diagnostics;
``.json`` with the config and every run's metrics; ``.png`` with Dice against train size.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

import dwp
from dwp._io import atomic_write
from unet3d.data import Case, SegmentationDataset, load_decathlon
from unet3d.inference import predict_volume
from unet3d.metrics import evaluate
from unet3d.model import UNet3D
from unet3d.strategies import ModelSpec, get_strategy, load_state_dict
from unet3d.train import TrainConfig, train

from .report import markdown_table, write_results

__all__ = ["METHODS", "PRESETS", "Cell", "Preset", "main", "run"]

#: Methods in the order of the paper's table.
METHODS = ("dwp", "pretrained", "pretrained_frozen", "random_init", "normal_prior")
LABELS = {
    "dwp": "UNet-DWP",
    "pretrained": "UNet-PR",
    "pretrained_frozen": "UNet-PRf",
    "random_init": "UNet-RI",
    "normal_prior": "UNet-N(0,1)",
}
BAYESIAN = ("dwp", "normal_prior")
#: Where the posterior means of each Bayesian method may start (``Preset.*_init``).
INITS = {"dwp_init": ("prior", "fresh", "pretrained"), "normal_init": ("fresh", "pretrained")}


@dataclass(frozen=True)
class Preset:
    """Every setting of the benchmark (``--set name=value`` overrides one).

    Data: ``resolution`` (mm), ``crop`` (the training / test volume size), ``n_source``
    and ``n_source_val`` source subjects, ``pool`` target training subjects to draw the
    subsets from, ``n_val`` target validation and ``n_test`` test subjects.
    Source nets: ``source_nets`` networks (seeds ``seed * 1000 + k``) trained for at most
    ``source_epochs`` epochs per cycle with ``source_restarts`` cyclical restarts.
    Prior: one kernel VAE per resolution group (``vae_*``, ``latent_dim``), kernels of L2
    norm below ``kernel_min_norm`` dropped.
    Target runs: ``steps`` optimiser steps per run whatever the training size (epochs
    ``= ceil(steps / batches per epoch)``, so small sets are not trained for less), or the
    paper's epoch budget when ``steps`` is 0; the ReduceLROnPlateau patience in epochs;
    validation every ``val_every_steps`` steps (0: every epoch); ``*_beta`` the KL
    weights; ``dwp_init`` how DWP posterior means start (``"prior"``: samples of the prior,
    the original paper's DWP initialisation; ``"fresh"``: He init; ``"pretrained"``: the
    source network's weights), ``normal_init`` the same for the N(0, 1) control
    (``"fresh"`` or ``"pretrained"``); ``freeze_depth`` of PRf; ``eval_samples``
    posterior samples averaged at test time (0: posterior means).
    Selection: each Bayesian method's KL weight and initialisation are chosen jointly from
    ``beta_grid`` x ``dwp_init_grid`` (``normal_init_grid``) by the validation Dice of the
    smallest training set, split 0; an empty grid leaves its setting as it is.
    """

    resolution: int = 4
    crop: tuple[int, int, int] = (40, 48, 40)
    widths: tuple[int, ...] = (16, 32, 32, 64)
    n_source: int = 24
    n_source_val: int = 4
    pool: int = 20
    n_val: int = 4
    n_test: int = 50
    sizes: tuple[int, ...] = (5, 10, 15, 20)
    splits: int = 3
    methods: tuple[str, ...] = METHODS
    source_nets: int = 1
    source_epochs: int = 20
    source_restarts: int = 1
    source_patience: int = 3
    vae_epochs: int = 100
    vae_hidden: int = 32
    vae_architecture: str = "mlp"
    latent_dim: int = 6
    kernel_min_norm: float = 0.0
    steps: int = 80
    val_every_steps: int = 10
    epochs: int = 500
    lr: float = 1e-3
    patience: int = 10
    min_lr: float = 1e-6
    dwp_beta: float = 1e-3
    normal_beta: float = 1e-3
    beta_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    dwp_init: str = "prior"
    normal_init: str = "fresh"
    dwp_init_grid: tuple[str, ...] = ("prior", "pretrained")
    normal_init_grid: tuple[str, ...] = ("fresh", "pretrained")
    freeze_depth: int = 1
    eval_samples: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
        if max(self.sizes) > self.pool:
            raise ValueError(f"train size {max(self.sizes)} exceeds the target pool {self.pool}")
        if min(self.sizes) < 2:
            raise ValueError("train sizes must be >= 2 (batch 2, as in the paper)")
        for name, allowed in INITS.items():
            for value in (getattr(self, name), *getattr(self, f"{name}_grid")):
                if value not in allowed:
                    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if any(c % 8 for c in self.crop):
            raise ValueError(f"crop {self.crop} must be divisible by 8 (the U-Net downsamples 3x)")

    def replace(self, **changes: Any) -> Preset:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, Preset] = {
    # The whole table on a 2-core CPU in at most 45 minutes: 4 mm volumes, the paper's
    # U-Net, a fixed step budget per run instead of training to convergence.
    "quick": Preset(),
    # Smoke test: every stage and file, tiny everything (the numbers mean nothing).
    "ci": Preset(
        crop=(32, 40, 32),
        widths=(4, 8, 8, 8),
        n_source=4,
        n_source_val=2,
        pool=3,
        n_val=2,
        n_test=3,
        sizes=(2, 3),
        splits=2,
        source_epochs=1,
        source_restarts=1,
        vae_epochs=2,
        steps=2,
        val_every_steps=0,
        beta_grid=(1e-3, 1e-2),
        normal_init_grid=(),
    ),
    # The paper's sizes and schedule (for a GPU): 2 mm volumes, 10 source nets with 10
    # restarts, train to convergence (ReduceLROnPlateau to the floor, at most 500 epochs).
    "paper": Preset(
        resolution=2,
        crop=(96, 112, 96),
        n_source=170,
        n_source_val=20,
        pool=20,
        n_val=10,
        n_test=50,
        source_nets=10,
        source_epochs=100,
        source_restarts=1,
        source_patience=10,
        vae_epochs=300,
        vae_hidden=64,
        steps=0,
        eval_samples=8,
    ),
}


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as f:
        f.write((json.dumps(obj, indent=1, default=str) + "\n").encode())


def _log(message: str) -> None:
    tqdm.write(f"[transfer] {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Stage 1: data


@dataclass
class Data:
    """Cases of every role, and the description that goes into the stage hashes."""

    source_train: list[Case]
    source_val: list[Case]
    pool: list[Case]
    val: list[Case]
    test: list[Case]
    key: dict[str, Any]


def _split_cases(cases: list[Case], counts: Sequence[int], root: Path) -> list[list[Case]]:
    if sum(counts) > len(cases):
        raise ValueError(f"{root}: {len(cases)} training cases, the preset needs {sum(counts)}")
    out, start = [], 0
    for n in counts:
        out.append(cases[start : start + n])
        start += n
    return out


def data_spec(cohort: str, preset: Preset, seed: int, folder: Path | None) -> dict[str, Any]:
    """What identifies a data set in the stage hashes: the generator's settings for a
    generated cohort (the same on every machine), the resolved folder for the user's own."""
    if folder is not None:
        return {"folder": str(Path(folder).resolve())}
    return {"cohort": cohort, "resolution": preset.resolution, "seed": seed}


def prepare_data(
    preset: Preset,
    work: Path,
    seed: int,
    source_data: Path | None = None,
    target_data: Path | None = None,
    progress: bool = True,
) -> Data:
    """Stage 1: generate (or reuse) the cohorts, or list the user's Decathlon folders."""
    import cohorts

    def generated(cohort: str, n_train: int, n_test: int, **options: Any) -> Path:
        folder = work / "data" / f"{cohort}-{preset.resolution}mm-seed{seed}"
        cohorts.generate(
            cohort,
            folder,
            n_train=n_train,
            n_test=n_test,
            resolution=preset.resolution,
            seed=seed,
            progress=progress,
            **options,
        )
        return folder

    key = {
        "source": data_spec("ms_source", preset, seed, source_data),
        "target": data_spec("tumour_target", preset, seed, target_data),
    }
    if source_data is None:
        source_data = generated("ms_source", preset.n_source + preset.n_source_val, 0)
    if target_data is None:
        target_data = generated(
            "tumour_target", preset.pool + preset.n_val, preset.n_test, whole_tumour=True
        )
    src_train, src_val = _split_cases(
        load_decathlon(source_data), (preset.n_source, preset.n_source_val), source_data
    )
    pool, val = _split_cases(load_decathlon(target_data), (preset.pool, preset.n_val), target_data)
    test = load_decathlon(target_data, split="test")
    if len(test) < preset.n_test:
        raise ValueError(f"{target_data}: {len(test)} test cases, the preset needs {preset.n_test}")
    test = test[: preset.n_test]
    unlabelled = [c.image for c in test if c.label is None]
    if unlabelled:
        raise ValueError(f"{target_data}: test image {unlabelled[0]} has no label in labelsTs/")
    return Data(src_train, src_val, pool, val, test, key)


# ---------------------------------------------------------------------------------------------
# Stage 2: source networks


def _train_config(preset: Preset, **changes: Any) -> TrainConfig:
    return TrainConfig(
        widths=preset.widths,
        size=preset.crop,
        lr=preset.lr,
        min_lr=preset.min_lr,
        binarise=True,
        progress=False,
        **changes,
    )


def _source_key(preset: Preset, seed: int, spec: Mapping[str, Any]) -> dict[str, Any]:
    fields = ("resolution", "crop", "widths", "lr", "min_lr", "n_source", "n_source_val")
    fields += ("source_nets", "source_epochs", "source_restarts", "source_patience")
    return {
        "stage": "source",
        "seed": seed,
        "data": dict(spec),
        **{f: getattr(preset, f) for f in fields},
    }


def _prior_key(preset: Preset, seed: int, source_key: Mapping[str, Any]) -> dict[str, Any]:
    fields = ("vae_epochs", "vae_hidden", "vae_architecture", "latent_dim", "kernel_min_norm")
    return {
        "stage": "prior",
        "seed": seed,
        "source": _digest(source_key),
        **{f: getattr(preset, f) for f in fields},
    }


def _open_stage(
    work: Path, stage: str, key: Mapping[str, Any], summary: str
) -> tuple[Path, dict[str, Any] | None]:
    """A stage's folder (``<stage>-<hash of key>``, created with its ``config.json``) and
    its finished summary file's contents, or ``None`` when the stage has not finished."""
    folder = work / f"{stage}-{_digest(key)}"
    done = folder / summary
    if done.exists():
        return folder, _located(json.loads(done.read_text()), folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", key)
    return folder, None


#: Summary entries holding file names, stored relative to the stage folder so that a work
#: folder can be moved or copied to another machine.
_FILE_ENTRIES = ("best", "kernel_sets", "prior", "figure")


def _located(summary: Any, folder: Path, inverse: bool = False) -> Any:
    """``summary`` with its file entries joined to ``folder`` (made relative to it when
    ``inverse``), recursively."""

    def convert(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, list):
            return [convert(v) for v in value]
        return str(Path(value).relative_to(folder) if inverse else folder / value)

    if isinstance(summary, list):
        return [_located(v, folder, inverse) for v in summary]
    if not isinstance(summary, dict):
        return summary
    return {
        k: convert(v) if k in _FILE_ENTRIES else _located(v, folder, inverse)
        for k, v in summary.items()
    }


def _finish_stage(folder: Path, name: str, summary: dict[str, Any]) -> dict[str, Any]:
    _write_json(folder / name, _located(summary, folder, inverse=True))
    return summary


def train_sources(preset: Preset, data: Data, work: Path, seed: int) -> dict[str, Any]:
    """Stage 2: train the source U-Nets; returns the kernel-set checkpoints and their scores."""
    key = _source_key(preset, seed, data.key["source"])
    folder, cached = _open_stage(work, "source", key, "sources.json")
    if cached is not None:
        return cached
    started = time.perf_counter()
    nets = []
    for k in range(preset.source_nets):
        _log(f"source net {k + 1}/{preset.source_nets} -> {folder / f'net{k}'}")
        config = _train_config(
            preset,
            strategy="random_init",
            out_dir=folder / f"net{k}",
            epochs=preset.source_epochs,
            restarts=preset.source_restarts,
            lr_patience=preset.source_patience,
            seed=seed * 1000 + k,
        )
        result = train(config, data.source_train, data.source_val, resume=True)
        kernel_sets = [str(p) for p in result.restart_checkpoints] or [
            str(folder / f"net{k}" / "last.pt")
        ]
        best = result.history[result.best_epoch] if result.best_epoch >= 0 else {}
        nets.append(
            {
                "best": str(folder / f"net{k}" / "best.pt"),
                "kernel_sets": kernel_sets,
                "val_dice": best.get("val_dice"),
                "epochs": len(result.history),
            }
        )
    summary = {
        "key": _digest(key),
        "nets": nets,
        "seconds": time.perf_counter() - started,
    }
    return _finish_stage(folder, "sources.json", summary)


# ---------------------------------------------------------------------------------------------
# Stage 3: the deep weight prior


def fit_prior(
    preset: Preset,
    data_key: Mapping[str, Any],
    sources: Mapping[str, Any],
    work: Path,
    seed: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Stage 3: kernel bank by resolution group, one kernel VAE per group, prior file, figure."""
    checkpoints = [p for net in sources["nets"] for p in net["kernel_sets"]]
    key = _prior_key(preset, seed, _source_key(preset, seed, data_key["source"]))
    folder, cached = _open_stage(work, "prior", key, "prior.json")
    if cached is not None:
        return cached
    started = time.perf_counter()
    template = UNet3D(widths=preset.widths)
    bank = dwp.collect_kernels(
        checkpoints,
        group_by="resolution",
        template=template,
        example_input=torch.zeros(1, 1, *preset.crop),
        min_norm=preset.kernel_min_norm or None,
    )
    _log(f"kernel bank: {len(bank.kernels)} kernels in {len(bank.groups())} groups")
    prior = dwp.DeepWeightPrior.fit(
        bank,
        latent_dim=preset.latent_dim,
        architecture=preset.vae_architecture,
        hidden=preset.vae_hidden,
        seed=seed,
        progress=progress,
        epochs=preset.vae_epochs,
    )
    bank.save(folder / "bank.pt")
    prior.save(folder / "prior.pt")
    figure = folder / "prior.png"
    try:
        from dwp.plot import plot_prior_samples

        plot_prior_samples(bank, prior, figure, seed=seed)
    except ImportError:  # matplotlib is optional
        figure = None
    summary = {
        "key": _digest(key),
        "prior": str(folder / "prior.pt"),
        "figure": None if figure is None else str(figure),
        "n_kernels": len(bank.kernels),
        "groups": {g: len(k) for g, k in bank.groups().items()},
        "fit": {
            group: {
                "kernels": fit["n_train"] + fit["n_val"],
                "vae_elbo": fit["best_val_elbo"],
                "gaussian_full": fit["baselines"]["full"],
                "gaussian_diagonal": fit["baselines"]["diagonal"],
            }
            for group, fit in prior.metadata.get("fits", {}).items()
        },
        "seconds": time.perf_counter() - started,
    }
    return _finish_stage(folder, "prior.json", summary)


# ---------------------------------------------------------------------------------------------
# Stage 4: the grid


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


def _selected(cell: Cell, only: Mapping[str, set[str]]) -> bool:
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


def _strategy_options(
    preset: Preset, method: str, sources: Mapping[str, Any] | None, prior: Mapping[str, Any] | None
) -> dict[str, Any]:
    # Paths are placeholders (None) when only the options' shape is needed (for keys).
    source = None if sources is None else sources["nets"][0]["best"]
    if method in ("pretrained", "pretrained_frozen"):
        options: dict[str, Any] = {"source": source}
        if method == "pretrained_frozen":
            options["freeze_depth"] = preset.freeze_depth
        return options
    if method == "normal_prior":
        if preset.normal_init == "pretrained":
            return {"beta": preset.normal_beta, "init": "pretrained", "source": source}
        return {"beta": preset.normal_beta}  # He-initialised means
    if method == "dwp":
        options = {
            "prior_path": None if prior is None else prior["prior"],
            "beta": preset.dwp_beta,
            "init": preset.dwp_init,
        }
        if preset.dwp_init == "pretrained":
            options["source"] = source
        return options
    return {}


def method_folder(
    preset: Preset, method: str, seed: int, data_key: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    """Name of a method's run folder (``<method>-<hash>``) and the key hashed into it.

    The key holds everything the runs depend on, upstream stages by their hashes rather
    than their file paths, so machines with other folders agree on it (``--merge``).
    Computed without touching any file.
    """
    fields = ("resolution", "crop", "widths", "pool", "n_val", "n_test", "lr", "min_lr")
    fields += ("steps", "val_every_steps", "epochs", "patience")
    options = _strategy_options(preset, method, None, None)
    source = _source_key(preset, seed, data_key["source"])
    key = {
        "stage": "target",
        "method": method,
        "seed": seed,
        "data": dict(data_key["target"]),
        "options": {k: v for k, v in options.items() if k not in ("source", "prior_path")},
        "source": _digest(source) if "source" in options else None,
        "prior": _digest(_prior_key(preset, seed, source)) if "prior_path" in options else None,
        "eval_samples": preset.eval_samples if method in BAYESIAN else 0,
        **{f: getattr(preset, f) for f in fields},
    }
    return f"{method}-{_digest(key)}", key


class Datasets:
    """The target volumes, loaded once per process and shared by every cell."""

    def __init__(self, preset: Preset, data: Data) -> None:
        options = {"normalise": "minmax", "binarise": True, "size": preset.crop, "cache": True}
        self.pool = SegmentationDataset(data.pool, **options)
        self.val = SegmentationDataset(data.val, **options)
        self.test = SegmentationDataset(data.test, **options)


def evaluate_model(
    model: torch.nn.Module, test: SegmentationDataset, preset: Preset, bayesian: bool, seed: int
) -> dict[str, Any]:
    """Dice, IoU and HD95 (mm) of ``model`` on every test volume (whole-volume prediction)."""
    predictions, labels = [], []
    samples = preset.eval_samples if bayesian else 0
    for i in range(len(test)):
        item = test[i]
        out = predict_volume(
            model,
            item["image"],
            n_samples=max(samples, 1),
            roi_size=preset.crop,
            sample=samples > 0,
            seed=seed + i,
        )
        predictions.append(out.mask)
        labels.append(item["label"])
    return evaluate(predictions, labels, spacing=(preset.resolution,) * 3)


def run_cell(
    cell: Cell,
    preset: Preset,
    data: Data,
    datasets: Datasets,
    folder: Path,
    options: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """Train one cell (resuming an interrupted run) and score it on the test set."""
    result_file = folder / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    train_idx = split_indices(preset.pool, cell.size, cell.split, seed)
    config = _train_config(
        preset,
        strategy=cell.method,
        strategy_options=options,
        out_dir=folder,
        epochs=_epochs(preset, cell.size),
        val_every=_val_every(preset, cell.size),
        lr_patience=preset.patience,
        seed=seed * 1000 + 100 * cell.split + cell.size,
    )
    started = time.perf_counter()
    result = train(config, Subset(datasets.pool, train_idx), datasets.val, resume=True)
    seconds = time.perf_counter() - started
    strategy = get_strategy(cell.method, **options)
    model = strategy.build_model(ModelSpec(widths=preset.widths))
    model.load_state_dict(load_state_dict(folder / "best.pt"))
    started = time.perf_counter()
    scores = evaluate_model(model, datasets.test, preset, strategy.bayesian, seed)
    eval_seconds = time.perf_counter() - started
    best = result.history[result.best_epoch]
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
        "best_epoch": result.best_epoch,
        "epochs": len(result.history),
        "stop_reason": result.stop_reason,
        "train_seconds": seconds,
        "eval_seconds": eval_seconds,
        "test": {k: scores[k] for k in ("dice", "iou", "hd95")},
        "strategy": strategy.describe(),
        "config": config.as_dict(),
    }
    _write_json(result_file, record)
    # The run's checkpoints are large and no longer needed (``best.pt`` stays).
    (folder / "last.pt").unlink(missing_ok=True)
    return record


# ---------------------------------------------------------------------------------------------
# Settings chosen on validation data

#: The settings of each Bayesian method chosen on validation: preset field -> its grid field.
TUNED = {
    "dwp": {"dwp_beta": "beta_grid", "dwp_init": "dwp_init_grid"},
    "normal_prior": {"normal_beta": "beta_grid", "normal_init": "normal_init_grid"},
}


def tuning_cell(preset: Preset, method: str) -> Cell:
    """Where settings are chosen: the smallest training set, split 0 (validation Dice)."""
    return Cell(method, preset.sizes[0], 0)


def candidates(preset: Preset, method: str) -> list[dict[str, Any]]:
    """The settings tried for ``method``: every combination of its non-empty grids, KL
    weights in increasing order, initialisations in grid order (``[]``: nothing to tune)."""
    axes = {}
    for name, grid_name in TUNED.get(method, {}).items():
        values = getattr(preset, grid_name)
        if values:
            axes[name] = sorted(values) if grid_name == "beta_grid" else list(values)
    if not axes:
        return []
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def choose_settings(
    preset: Preset, method: str, score: Callable[[Preset], float | None]
) -> tuple[Preset, dict[str, Any] | None]:
    """The preset with ``method``'s tuned settings (:data:`TUNED`) set to the candidate
    of highest validation Dice (``score(candidate_preset)``; the test set is never looked
    at).

    Ties go to the earlier candidate of :func:`candidates` (the smaller KL weight, then
    the earlier initialisation).  Without a grid (or for a method with nothing to tune)
    the preset is returned unchanged with ``None``.  A candidate scored ``None`` (a cell
    not run yet, in :func:`merge`) makes the choice impossible: ``ValueError``.
    """
    options = candidates(preset, method)
    if not options:
        return preset, None
    scores = [score(preset.replace(**option)) for option in options]
    missing = [option for option, value in zip(options, scores, strict=True) if value is None]
    if missing:
        raise ValueError(f"{method}: no validation result for {missing}; run those cells")
    best = max(range(len(options)), key=scores.__getitem__)  # the first of equal maxima
    cell = tuning_cell(preset, method)
    selection = {
        "method": method,
        "size": cell.size,
        "split": cell.split,
        "candidates": [
            {**option, "val_dice": value} for option, value in zip(options, scores, strict=True)
        ],
        "chosen": options[best],
    }
    return preset.replace(**options[best]), selection


# ---------------------------------------------------------------------------------------------
# Orchestration


@dataclass
class Plan:
    """What :func:`run` did: the settings, the stage summaries and every cell's record."""

    preset: Preset
    seed: int
    data_key: dict[str, Any]
    sources: dict[str, Any] | None
    prior: dict[str, Any] | None
    records: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float | None = None
    subjects: dict[str, list[str]] | None = None
    selections: list[dict[str, Any]] = field(default_factory=list)
    execution: dict[str, int] | None = None


@dataclass(frozen=True)
class Task:
    """One cell to run with its settings: what a worker process needs besides the data."""

    cell: Cell
    preset: Preset
    folder: Path
    options: dict[str, Any]
    seed: int


_WORKER: tuple[Data, Datasets] | None = None


def _init_worker(preset: Preset, data: Data, threads: int) -> None:
    global _WORKER
    torch.set_num_threads(threads)
    _WORKER = (data, Datasets(preset, data))


def _run_task(task: Task) -> dict[str, Any]:
    assert _WORKER is not None, "worker not initialised"
    data, datasets = _WORKER
    return run_cell(task.cell, task.preset, data, datasets, task.folder, task.options, task.seed)


class CellRunner:
    """Runs cells in this process (``jobs=1``) or in ``jobs`` worker processes.

    Every run seeds itself, so a cell's numbers depend on its settings and on the torch
    thread count of the process that runs it (``threads`` each), not on which worker runs
    it or when.  On a 2-core CPU two 1-thread runs at a time train 1.4x faster than one
    2-thread run (small 3D convolutions use a second thread poorly).
    """

    def __init__(self, preset: Preset, data: Data, jobs: int = 1, threads: int = 1) -> None:
        self.pool = None
        if jobs > 1:
            # spawn, not fork: a forked child of a process that already ran OpenMP code
            # (the source nets, the VAEs) can deadlock in its first parallel region.
            self.pool = ProcessPoolExecutor(
                jobs,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(preset, data, threads),
            )
        else:
            torch.set_num_threads(threads)
            self.local = (data, Datasets(preset, data))

    def run(
        self, tasks: Sequence[Task], done: Callable[[Task], None] | None = None
    ) -> list[dict[str, Any]]:
        """The records of ``tasks`` in their order; ``done(task)`` after each one."""
        records: list[dict[str, Any] | None] = [None] * len(tasks)
        if self.pool is None:
            data, datasets = self.local
            for i, t in enumerate(tasks):
                records[i] = run_cell(t.cell, t.preset, data, datasets, t.folder, t.options, t.seed)
                if done:
                    done(t)
            return records  # type: ignore[return-value]
        futures = {self.pool.submit(_run_task, t): i for i, t in enumerate(tasks)}
        try:
            for future in as_completed(futures):
                records[futures[future]] = future.result()
                if done:
                    done(tasks[futures[future]])
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return records  # type: ignore[return-value]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def default_jobs() -> int:
    """Cells run at a time by default: the CPU count, at most 2 (see :class:`CellRunner`)."""
    return max(1, min(2, os.cpu_count() or 1))


def run(
    preset: Preset,
    work: Path,
    seed: int = 0,
    *,
    only: Mapping[str, set[str]] | None = None,
    source_data: Path | None = None,
    target_data: Path | None = None,
    progress: bool = True,
    jobs: int = 1,
    threads: int | None = None,
) -> Plan:
    """Run the stages the selected cells need, then the cells (cached ones are read back).

    The source nets and the prior use ``threads`` torch threads (default: torch's
    current count); the cells run ``jobs`` at a time with ``threads // jobs`` each.
    """
    started = time.perf_counter()
    threads = threads or torch.get_num_threads()
    if jobs < 1 or threads < 1:
        raise ValueError(f"jobs and threads must be >= 1, got {jobs} and {threads}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cells = [c for c in grid(preset) if _selected(c, only or {})]
    if not cells:
        raise ValueError(f"--only {only} selects no cell of the grid")
    methods = {c.method for c in cells}
    data = prepare_data(preset, work, seed, source_data, target_data, progress)
    sources = prior = None
    # DWP needs the source kernels whatever its initialisation; N(0, 1) only to start there.
    needs_source = bool(methods & {"pretrained", "pretrained_frozen", "dwp"}) or (
        "normal_prior" in methods and "pretrained" in (preset.normal_init, *preset.normal_init_grid)
    )
    if needs_source:
        sources = train_sources(preset, data, work, seed)
    if "dwp" in methods:
        prior = fit_prior(preset, data.key, sources, work, seed, progress)

    def task(candidate: Preset, cell: Cell) -> Task:
        name, key = method_folder(candidate, cell.method, seed, data.key)
        folder = work / "runs" / name
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "config.json").exists():
            _write_json(folder / "config.json", key)
        options = _strategy_options(candidate, cell.method, sources, prior)
        return Task(cell, candidate, folder / cell.folder(), options, seed)

    def finished(t: Task) -> bool:
        return (t.folder / "result.json").exists()

    tuned = sorted(methods & set(TUNED))
    tuning = {
        method: [
            task(preset.replace(**option), tuning_cell(preset, method))
            for option in candidates(preset, method)
        ]
        for method in tuned
    }
    tuning_tasks = [t for ts in tuning.values() for t in ts]
    # An upper bound until the settings are chosen (a chosen tuning run is a grid cell).
    total = len(tuning_tasks) + sum(c != tuning_cell(preset, c.method) for c in cells)
    done = sum(map(finished, tuning_tasks))
    bar = tqdm(total=total, initial=done, desc="transfer runs", disable=not progress)

    def advance(t: Task) -> None:
        bar.set_postfix_str(f"{t.cell.method} n={t.cell.size} split={t.cell.split}")
        bar.update()

    runner = CellRunner(preset, data, jobs, max(1, threads // jobs))
    try:
        runner.run([t for t in tuning_tasks if not finished(t)], advance)
        selections = []
        for method in tuned:

            def score(candidate: Preset, method: str = method) -> float:
                # The folder hash holds this method's settings only, so the other
                # method's choice (already in ``preset``) does not move it.
                folder = task(candidate, tuning_cell(candidate, method)).folder
                return json.loads((folder / "result.json").read_text())["val_dice"]

            preset, selection = choose_settings(preset, method, score)
            if selection:
                _log(f"{method}: {selection['chosen']} chosen on validation Dice")
                selections.append(selection)
        tasks = [task(preset, c) for c in cells]
        bar.total = bar.n + sum(not finished(t) for t in tasks)
        bar.refresh()
        runner.run([t for t in tasks if not finished(t)], advance)
    finally:
        runner.close()
        bar.close()
    records = [json.loads((t.folder / "result.json").read_text()) for t in tasks]
    roles = {"pool": data.pool, "val": data.val, "test": data.test}
    subjects = {role: [c.id for c in cases] for role, cases in roles.items()}
    plan = Plan(preset, seed, data.key, sources, prior, records, subjects=subjects)
    plan.selections = selections
    plan.wall_seconds = time.perf_counter() - started
    plan.execution = {"jobs": jobs, "threads": threads, "threads_per_run": max(1, threads // jobs)}
    return plan


def merge(
    preset: Preset,
    work_dirs: Sequence[Path],
    seed: int = 0,
    *,
    source_data: Path | None = None,
    target_data: Path | None = None,
) -> Plan:
    """Finished cells of this configuration from several work folders (e.g. one per
    machine), for one report; nothing is trained.

    Run folders of other configurations are ignored (their hash differs); a cell found in
    two folders must agree.  Source and prior summaries come from the first folder that
    has them.
    """
    data_key = {
        "source": data_spec("ms_source", preset, seed, source_data),
        "target": data_spec("tumour_target", preset, seed, target_data),
    }
    source_id = _digest(_source_key(preset, seed, data_key["source"]))
    prior_id = _digest(_prior_key(preset, seed, _source_key(preset, seed, data_key["source"])))
    work_dirs = [Path(w) for w in work_dirs]
    for work in work_dirs:
        if not work.is_dir():
            raise FileNotFoundError(f"--merge: {work} is not a folder")

    def stage(name: str) -> dict[str, Any] | None:
        for work in work_dirs:
            if (work / name).exists():
                return _located(json.loads((work / name).read_text()), (work / name).parent)
        return None

    def records(candidate: Preset, method: str) -> dict[tuple, dict[str, Any]]:
        name, _ = method_folder(candidate, method, seed, data_key)
        found: dict[tuple, dict[str, Any]] = {}
        for work in work_dirs:
            for path in sorted((work / "runs" / name).glob("n*/split*/result.json")):
                record = json.loads(path.read_text())
                cell = (record["method"], record["size"], record["split"])
                if cell in found and not math.isclose(found[cell]["dice"], record["dice"]):
                    raise ValueError(f"{path}: disagrees with another copy of cell {cell}")
                found[cell] = record
        return found

    sources = stage(f"source-{source_id}/sources.json")
    prior = stage(f"prior-{prior_id}/prior.json")
    selections = []
    for method in sorted(set(preset.methods) & set(TUNED)):

        def score(candidate: Preset, method: str = method) -> float | None:
            cell = tuning_cell(candidate, method)
            record = records(candidate, method).get((method, cell.size, cell.split))
            return None if record is None else record["val_dice"]

        preset, selection = choose_settings(preset, method, score)
        if selection:
            selections.append(selection)
    found = {k: v for method in preset.methods for k, v in records(preset, method).items()}
    wanted = {(c.method, c.size, c.split) for c in grid(preset)}
    rows = [found[k] for k in sorted(found) if k in wanted]
    if len(rows) < len(wanted):
        _log(f"{len(wanted) - len(rows)} of {len(wanted)} cells have no result yet")
    return Plan(preset, seed, data_key, sources, prior, rows, selections=selections)


# ---------------------------------------------------------------------------------------------
# Report


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample std (``None`` from a single value: no spread to report)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else None


def summarise(records: Sequence[Mapping[str, Any]], preset: Preset) -> dict[str, Any]:
    """Per (method, size): mean and std over splits of the test Dice and IoU; paired
    differences DWP minus each baseline across splits with a paired t-test."""
    from scipy import stats

    by = {(r["method"], r["size"], r["split"]): r for r in records}
    table = {}
    for (method, size, _), _r in by.items():
        if (method, size) in table:
            continue
        splits = sorted(s for m, n, s in by if m == method and n == size)
        dice = [by[method, size, s]["dice"] for s in splits]
        iou = [by[method, size, s]["iou"] for s in splits]
        table[method, size] = {"dice": _mean_std(dice), "iou": _mean_std(iou), "n": len(splits)}
    paired = []
    for baseline in [m for m in preset.methods if m != "dwp"]:
        for size in preset.sizes:
            splits = [
                s
                for s in range(preset.splits)
                if ("dwp", size, s) in by and (baseline, size, s) in by
            ]
            if not splits:
                continue
            a = np.array([by["dwp", size, s]["dice"] for s in splits])
            b = np.array([by[baseline, size, s]["dice"] for s in splits])
            diff = a - b
            p = float(stats.ttest_rel(a, b).pvalue) if len(splits) > 1 and diff.std() > 0 else None
            paired.append(
                {
                    "baseline": baseline,
                    "size": size,
                    "n_splits": len(splits),
                    "mean_diff": float(diff.mean()),
                    "std_diff": float(diff.std(ddof=1)) if len(splits) > 1 else None,
                    "p_value": p,
                }
            )
    return {"table": table, "paired": paired}


def _fmt(mean_std: tuple[float, float | None]) -> str:
    mean, std = mean_std
    return f"{mean:.2f} (-)" if std is None else f"{mean:.2f} ({std:.2f})"


def render(summary: Mapping[str, Any], plan_info: Mapping[str, Any], preset: Preset) -> str:
    """The Markdown report: paper-format tables, paired differences, diagnostics."""
    table = summary["table"]
    methods = [m for m in preset.methods if any(k[0] == m for k in table)]
    parts = []
    for metric, title in (("dice", "Dice"), ("iou", "IoU")):
        rows = [
            [n, *(_fmt(table[m, n][metric]) if (m, n) in table else "-" for m in methods)]
            for n in preset.sizes
        ]
        parts.append(
            f"**{title}** on {preset.n_test} test volumes, mean (std) over splits:\n\n"
            + markdown_table(["train size", *(LABELS[m] for m in methods)], rows)
        )
    if summary["paired"]:
        rows = [
            [
                f"DWP - {LABELS[p['baseline']]}",
                p["size"],
                f"{p['mean_diff']:+.3f} ("
                + ("-" if p["std_diff"] is None else f"{p['std_diff']:.3f}")
                + ")",
                "-" if p["p_value"] is None else f"{p['p_value']:.3f}",
            ]
            for p in summary["paired"]
        ]
        parts.append(
            "Paired Dice differences across splits (same training subsets), paired t-test:\n\n"
            + markdown_table(["difference", "train size", "mean (std)", "p"], rows)
        )
    for sel in plan_info.get("selections") or []:
        names = list(sel["chosen"])
        rows = [
            [
                *(_setting(c[n]) for n in names),
                f"{c['val_dice']:.3f}",
                "chosen" if all(c[n] == sel["chosen"][n] for n in names) else "",
            ]
            for c in sel["candidates"]
        ]
        parts.append(
            f"{LABELS[sel['method']]}: settings chosen on the validation Dice of "
            f"n={sel['size']}, split {sel['split']} (never the test set):\n\n"
            + markdown_table([*names, "validation Dice", ""], rows)
        )
    diag = plan_info.get("diagnostics")
    if diag:
        parts.append(diag)
    return "\n\n".join(parts)


def _setting(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def diagnostics(plan: Plan) -> str:
    """Source quality and prior fit: what to look at when DWP does not win."""
    lines = []
    if plan.sources:
        dice = [n["val_dice"] for n in plan.sources["nets"] if n["val_dice"] is not None]
        sets = sum(len(n["kernel_sets"]) for n in plan.sources["nets"])
        if dice:
            lines.append(
                f"Source: {len(plan.sources['nets'])} U-Net(s), {sets} kernel sets, "
                f"validation Dice {', '.join(f'{d:.3f}' for d in dice)}."
            )
    if plan.prior:
        rows = [
            [
                group,
                fit["kernels"],
                f"{fit['vae_elbo']:.2f}",
                f"{fit['gaussian_full']:.2f}",
                f"{fit['gaussian_diagonal']:.2f}",
            ]
            for group, fit in plan.prior["fit"].items()
        ]
        lines.append(
            "Kernel VAEs (held-out log-likelihood bound per kernel, nats; higher is better) "
            "against Gaussians fitted to the same kernels:\n\n"
            + markdown_table(
                ["group", "kernels", "VAE ELBO", "full-cov Gaussian", "diagonal Gaussian"], rows
            )
        )
    return "\n\n".join(lines)


def plot(summary: Mapping[str, Any], preset: Preset, path: Path) -> None:
    """Dice against train size, one line per method, error bars = std over splits."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 4))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for offset, method in enumerate(preset.methods):
        points = [
            (n, *summary["table"][method, n]["dice"])
            for n in preset.sizes
            if (method, n) in summary["table"]
        ]
        if not points:
            continue
        n, mean, std = (np.array(v, dtype=float) for v in zip(*points, strict=True))
        ax.errorbar(
            n + 0.15 * (offset - 2), mean, yerr=std, marker="o", capsize=3, label=LABELS[method]
        )
    ax.set_xlabel("target training volumes")
    ax.set_ylabel(f"test Dice ({preset.n_test} volumes)")
    ax.set_xticks(list(preset.sizes))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    figure.tight_layout()
    with atomic_write(path) as f:
        figure.savefig(f, format="png", dpi=120)


def write_report(plan: Plan, out: Path, name: str, command: str | None = None) -> tuple[Path, Path]:
    """Write ``<name>.md``, ``<name>.json`` (config and every run's record) and ``<name>.png``."""
    records = plan.records
    summary = summarise(records, plan.preset)
    info = {"diagnostics": diagnostics(plan), "selections": plan.selections}
    text = render(summary, info, plan.preset)
    config = {
        "preset": dataclasses.asdict(plan.preset),
        "seed": plan.seed,
        "data": plan.data_key,
        "subjects": plan.subjects,
        "selections": plan.selections,
        "execution": plan.execution,
        "sources": plan.sources,
        "prior": plan.prior,
        "wall_seconds": plan.wall_seconds,
        "summary": {
            "table": [
                {"method": m, "size": n, **v} for (m, n), v in sorted(summary["table"].items())
            ],
            "paired": summary["paired"],
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    try:
        plot(summary, plan.preset, out / f"{name}.png")
        text += f"\n\n![Dice against train size]({name}.png)"
    except ImportError:
        pass
    return write_results(name, config, records, text, out, command=command)


# ---------------------------------------------------------------------------------------------
# Command line


def _override(preset: Preset, assignments: Sequence[str]) -> Preset:
    types = {f.name: f.type for f in dataclasses.fields(Preset)}
    changes: dict[str, Any] = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep or name not in types:
            raise ValueError(f"--set {item!r}: expected name=value with name in {sorted(types)}")
        current = getattr(preset, name)
        if isinstance(current, tuple):
            element = type(current[0]) if current else str
            changes[name] = tuple(element(v) for v in value.split(",") if v)
        else:
            changes[name] = type(current)(value)
    return preset.replace(**changes)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dwp-transfer",
        description="DWP vs pretrain vs frozen pretrain vs random init (Kuzina et al. 2019).",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("runs/transfer"),
        help="where stages cache their outputs (default runs/transfer)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results"),
        help="where the report goes (default benchmarks/results)",
    )
    parser.add_argument("--name", help="report file name (default transfer[_<preset>])")
    parser.add_argument("--only", help="run some cells only, e.g. method=dwp,size=5+10,split=0")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="WORK_DIR",
        help="write the report from finished cells of these work folders",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a preset setting (repeatable), e.g. dwp_beta=1e-4",
    )
    parser.add_argument("--source-data", type=Path, help="your source Decathlon folder")
    parser.add_argument("--target-data", type=Path, help="your target Decathlon folder")
    parser.add_argument(
        "--jobs",
        type=int,
        default=default_jobs(),
        help="runs trained at a time, in worker processes (default: CPU count, at most 2)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads in all (default: torch's count); each of the --jobs runs gets "
        "threads // jobs, and a run's numbers depend on that count",
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        preset = _override(PRESETS[args.preset], args.set)
        only = parse_only(args.only)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        print("error: --jobs and --threads must be >= 1", file=sys.stderr)
        return 2
    name = args.name or ("transfer" if args.preset == "quick" else f"transfer_{args.preset}")
    command = "python -m benchmarks.transfer " + " ".join(
        sys.argv[1:] if argv is None else list(argv)
    )
    progress = not args.no_progress
    try:
        if args.merge:
            plan = merge(
                preset,
                args.merge,
                args.seed,
                source_data=args.source_data,
                target_data=args.target_data,
            )
        else:
            plan = run(
                preset,
                args.work_dir,
                args.seed,
                only=only,
                source_data=args.source_data,
                target_data=args.target_data,
                progress=progress,
                jobs=args.jobs,
                threads=args.threads,
            )
    except (ValueError, OSError) as error:  # DataError and CheckpointError are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return 2
    if only:
        for record in plan.records:
            print(
                json.dumps(
                    {k: record[k] for k in ("method", "size", "split", "dice", "iou", "val_dice")}
                )
            )
        return 0
    write_report(plan, args.out, name, command)
    print((args.out / f"{name}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

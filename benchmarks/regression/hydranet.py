"""Section (b): Hydranet vs its base regressor, alone, with an N(0, 1) prior and with a deep
weight prior learned on the ``ms_source`` cohort, on ``lesion_count`` count and volume.

The prior is one run (:class:`PriorRun`, its file by :meth:`dwp.DeepWeightPrior.save`), each method x
training size x repetition another (:class:`HydraRun`, reading the prior file)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import dwp
import regression3d as r3d
from dwp.train_log import optional_tensorboard

from .cohort import Cohort, lesion_cohorts, load_cohort
from .config import LESION_CROP, LESION_SCALING, METHODS, Preset
from .runs import Run

__all__ = ["HydraRun", "PriorRun", "collect_hydranet", "fit_source_prior", "hydranet_runs"]


def _lesion_targets(c: Cohort) -> Tensor:
    return torch.tensor(np.stack([c.targets["count"], c.targets["volume_mm3"]], 1)).float()


def fit_source_prior(
    preset: Preset,
    seed: int,
    tensorboard: Path | None = None,
    device: str = "cpu",
    amp: str = "off",
) -> tuple[dwp.DeepWeightPrior, dict[str, Any]]:
    """Deep weight prior on the 3x3x3 kernels of base regressors trained on ``ms_source``
    (MS-like lesions: their count and volume), one VAE for all layers; with
    ``tensorboard``, each source net's fit logs into ``tensorboard/source/net<k>``.  The
    source nets train in mixed precision ``amp`` (the kernel VAE in float32)."""
    source = load_cohort(
        "ms_source", preset.source_subjects, "train", seed + 1000, LESION_CROP, LESION_SCALING
    )
    y = _lesion_targets(source)
    config = r3d.TrainConfig(
        steps=preset.regressor_steps,
        batch_size=preset.batch_size,
        lr=preset.regressor_lr,
        seed=seed,
        device=device,
        amp=amp,
    )
    nets = []
    for k in range(preset.source_nets):
        torch.manual_seed(seed + 100 + k)
        net = r3d.BaseRegressor(1, 2, preset.regressor_widths, preset.feature_scale)
        with optional_tensorboard(tensorboard, "source", f"net{k}", purge_step=0) as logger:
            fitted = r3d.fit(net, source.x, y, replace(config, seed=seed + k), logger=logger)
        nets.append(fitted.model.cpu())  # the kernel bank is collected on the CPU
    bank = dwp.collect_kernels(nets, group_by="all", kernel_shape=(3, 3, 3))
    prior = dwp.DeepWeightPrior.fit(
        bank, epochs=preset.vae_epochs, progress=False, seed=seed, latent_dim=4, device=device
    )
    held_out = prior.held_out("all")  # the test kernels, used for no choice of the fit
    info = {
        "kernels": len(bank),
        "test_kernels": held_out["test_kernels"],
        "vae_test_iwae": held_out["vae"],
        "gaussian_full": held_out["kernel_gaussian"],
        "gaussian_diagonal": held_out["diagonal_gaussian"],
    }
    return prior, info


@dataclass(frozen=True, kw_only=True)
class PriorRun(Run):
    """The deep weight prior of :func:`fit_source_prior`: the prior file (:attr:`tensors`,
    by :meth:`dwp.DeepWeightPrior.save`) and its fit summary."""

    def stem(self) -> str:
        return "prior"

    def compute(self) -> None:
        started = time.perf_counter()
        prior, info = fit_source_prior(
            self.preset, self.seed, self.tensorboard, self.device, self.amp
        )
        prior.save(self.tensors)
        self.finish({"info": info}, started=started)


@dataclass(frozen=True, kw_only=True)
class HydraRun(Run):
    """One ``method`` trained on ``n_train`` subjects of repetition ``rep`` (seed ``seed +
    rep``), on lesion count and volume (one two-output net); ``prior``: the file of the
    deep weight prior (``base_dwp`` only).  With ``tensorboard``, the fit logs into
    ``tensorboard/hydranet/n<size>_seed<seed>/<method>``."""

    n_train: int
    rep: int
    method: str
    prior: Path | None = None

    def stem(self) -> str:
        return f"hydranet_n{self.n_train}_seed{self.seed + self.rep}_{self.method}"

    def train_config(self, run_seed: int) -> r3d.TrainConfig:
        """The fit's settings: the preset's, Hydranet's sets for ``hydranet``."""
        preset = self.preset
        config = r3d.TrainConfig(
            steps=preset.regressor_steps, batch_size=preset.batch_size, lr=preset.regressor_lr,
            seed=run_seed, beta=preset.beta, kl_warmup=preset.regressor_steps // 2,
            device=self.device, amp=self.amp,
        )  # fmt: skip
        if self.method == "hydranet":
            hydra = r3d.HydraConfig(4, 0.1, sets_per_step=preset.hydranet_sets_per_step)
            config = replace(config, hydranet=hydra)
        return config

    def augmentation(self, run_seed: int) -> Callable[[Tensor], Tensor] | None:
        """The training batches' augmentation (none: the benchmark's methods train on the
        images as they are)."""
        return None

    def row_labels(self) -> dict[str, Any]:
        """What the result rows say they are."""
        return {"section": "hydranet"}

    def cohorts(self) -> tuple[Cohort, Cohort]:
        """The training pool and the test subjects."""
        return lesion_cohorts(self.preset, self.seed)

    def cost(self) -> float:
        """Compute relative to a base regressor's run, to start the longest runs first:
        Hydranet's sets cost ~4x a base run (measured: 302 s vs 70 s on one thread)."""
        return 4.0 if self.method == "hydranet" else 1.0

    def compute(self) -> None:
        started = time.perf_counter()
        pool, test = self.cohorts()
        # loaded before the seed is set: building the prior's networks draws random numbers
        prior = None if self.prior is None else dwp.DeepWeightPrior.load(self.prior)
        preset, n_train, method, tensorboard = (
            self.preset,
            self.n_train,
            self.method,
            self.tensorboard,
        )
        rows = []
        y_pool, y_test = _lesion_targets(pool), _lesion_targets(test).numpy()
        run_seed = self.seed + self.rep
        # a different training subset per repetition, the same for every method
        pick = torch.randperm(len(pool.x), generator=torch.Generator().manual_seed(run_seed))
        idx = pick[:n_train]
        x, y = pool.x[idx], y_pool[idx]
        start = time.perf_counter()
        torch.manual_seed(run_seed)
        net = r3d.BaseRegressor(1, 2, preset.regressor_widths, preset.feature_scale)
        if method == "base_normal_prior":
            net = r3d.make_bayesian(net, dwp.NormalPrior())
        elif method == "base_dwp":
            net = r3d.make_bayesian(net, kernel_prior=prior, init="prior")
        config, augment = self.train_config(run_seed), self.augmentation(run_seed)
        run = f"n{n_train}_seed{run_seed}"
        with optional_tensorboard(tensorboard, "hydranet", run, method, purge_step=0) as logger:
            fitted = r3d.fit(net, x, y, config, augment=augment, logger=logger)
        mean, variance = fitted.predict(test.x, n_samples=8)
        train_mean, _ = fitted.predict(x, n_samples=8)
        # the paper's inference: the other branches see zero images, f(x) + 3 f(0)
        zero, _ = fitted.predict(torch.zeros_like(test.x[:1]), n_samples=8)
        paper = mean + 3 * (zero - fitted.shift)
        for j, target in enumerate(("count", "volume_mm3")):
            rows.append(
                {
                    **self.row_labels(),
                    "method": method,
                    "target": target,
                    "n_train": n_train,
                    "seed": run_seed,
                    "mse": r3d.mse(y_test[:, j], mean[:, j]),
                    "icc": r3d.icc_agreement(y_test[:, j], mean[:, j]),
                    "train_icc": r3d.icc_agreement(y[:, j].numpy(), train_mean[:, j]),
                    "icc_paper_inference": r3d.icc_agreement(y_test[:, j], paper[:, j]),
                    "zero_image": float(zero[0, j]),
                    "mae": r3d.mae(y_test[:, j], mean[:, j]),
                    "epistemic_sd": float(variance[:, j].sqrt().mean()),
                    "seconds": time.perf_counter() - start,
                }
            )
        self.finish({"rows": rows}, started=started)


def hydranet_runs(
    preset: Preset, seed: int, folder: Path, prior: Path, tensorboard: Path | None = None
) -> list[HydraRun]:
    """Every method x training size x repetition, in the report's order (the Bayesian
    methods at ``preset.bayesian_sizes`` only); ``prior``: the :class:`PriorRun`'s file."""
    bayesian_sizes = preset.bayesian_sizes or preset.lesion_sizes
    return [
        HydraRun(
            folder=folder,
            preset=preset,
            seed=seed,
            tensorboard=tensorboard,
            n_train=n_train,
            rep=rep,
            method=method,
            prior=prior if method == "base_dwp" else None,
        )
        for n_train in preset.lesion_sizes
        for rep in range(preset.seeds)
        for method in METHODS
        if method in ("base", "hydranet") or n_train in bayesian_sizes
    ]


def collect_hydranet(runs: list[HydraRun]) -> list[dict[str, Any]]:
    """The finished runs' rows (two per run: count and volume)."""
    return [row for run in runs for row in run.record()["rows"]]

"""Section (b): Hydranet vs its base regressor, alone, with an N(0, 1) prior and with a deep
weight prior learned on the ``ms_source`` cohort, on ``lesion_count`` count and volume."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

import dwp
import regression3d as r3d

from .cohort import Cohort, load_cohort
from .config import LESION_CROP, METHODS, Preset

__all__ = ["fit_source_prior", "run_hydranet"]


def _lesion_targets(c: Cohort) -> Tensor:
    return torch.tensor(np.stack([c.targets["count"], c.targets["volume_mm3"]], 1)).float()


def fit_source_prior(preset: Preset, seed: int) -> tuple[dwp.DeepWeightPrior, dict[str, Any]]:
    """Deep weight prior on the 3x3x3 kernels of base regressors trained on ``ms_source``
    (MS-like lesions: their count and volume), one VAE for all layers."""
    source = load_cohort(
        "ms_source", preset.source_subjects, "train", seed + 1000, LESION_CROP, "minmax"
    )
    y = _lesion_targets(source)
    config = r3d.TrainConfig(
        steps=preset.regressor_steps, batch_size=preset.batch_size, lr=preset.lr, seed=seed
    )
    nets = []
    for k in range(preset.source_nets):
        torch.manual_seed(seed + 100 + k)
        net = r3d.BaseRegressor(1, 2, preset.regressor_widths)
        nets.append(r3d.fit(net, source.x, y, replace(config, seed=seed + k)).model)
    bank = dwp.collect_kernels(nets, group_by="all", kernel_shape=(3, 3, 3))
    prior = dwp.DeepWeightPrior.fit(
        bank, epochs=preset.vae_epochs, progress=False, seed=seed, latent_dim=4
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


def run_hydranet(
    preset: Preset, seed: int, prior: dwp.DeepWeightPrior, test: Cohort, pool: Cohort
) -> list[dict[str, Any]]:
    """Every method x training size x seed on lesion count and volume (one two-output net)."""
    rows = []
    y_pool, y_test = _lesion_targets(pool), _lesion_targets(test).numpy()
    for n_train in preset.lesion_sizes:
        for rep in range(preset.seeds):
            run_seed = seed + rep
            # a different training subset per repetition, the same for every method
            pick = torch.randperm(len(pool.x), generator=torch.Generator().manual_seed(run_seed))
            idx = pick[:n_train]
            x, y = pool.x[idx], y_pool[idx]
            for method in METHODS:
                start = time.perf_counter()
                torch.manual_seed(run_seed)
                net = r3d.BaseRegressor(1, 2, preset.regressor_widths)
                config = r3d.TrainConfig(
                    steps=preset.regressor_steps, batch_size=preset.batch_size, lr=preset.lr,
                    seed=run_seed, beta=preset.beta, kl_warmup=preset.regressor_steps // 2,
                )  # fmt: skip
                if method == "hydranet":
                    config = replace(config, hydranet=r3d.HydraConfig(4, 0.1))
                elif method == "base_normal_prior":
                    net = r3d.make_bayesian(net, dwp.NormalPrior())
                elif method == "base_dwp":
                    net = r3d.make_bayesian(net, kernel_prior=prior, init="prior")
                fitted = r3d.fit(net, x, y, config)
                mean, variance = fitted.predict(test.x, n_samples=8)
                for j, target in enumerate(("count", "volume_mm3")):
                    rows.append(
                        {
                            "section": "hydranet",
                            "method": method,
                            "target": target,
                            "n_train": n_train,
                            "seed": run_seed,
                            "mse": r3d.mse(y_test[:, j], mean[:, j]),
                            "icc": r3d.icc_agreement(y_test[:, j], mean[:, j]),
                            "mae": r3d.mae(y_test[:, j], mean[:, j]),
                            "epistemic_sd": float(variance[:, j].sqrt().mean()),
                            "seconds": time.perf_counter() - start,
                        }
                    )
    return rows

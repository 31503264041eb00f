"""Section (c): importance maps scored against the known ageing map: a noise model
(Bintsi et al. 2021) on the frozen best age BagNet, next to the BagNets' local maps.

The noise model is one run (:class:`ImportanceRun`, reading the best BagNet run's age
net); the local maps' scores are computed from the BagNet runs' maps when collecting."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

import cohorts
import regression3d as r3d
from cohorts.ageing import ageing_map

from .bagnets import BagnetRun
from .cohort import Cohort, age_cohorts
from .config import AGE_CROP, RESOLUTION
from .runs import Run

__all__ = ["ImportanceRun", "collect_importance", "importance_run"]


def _template() -> np.ndarray:
    """The template's ageing map on the benchmark's crop: 1 ventricles, 2 cortex."""
    return ageing_map(cohorts.load_anatomy(RESOLUTION))[AGE_CROP]


@dataclass(frozen=True, kw_only=True)
class ImportanceRun(Run):
    """The noise model on the frozen age net of ``bagnet`` (the best receptive field)."""

    bagnet: BagnetRun

    def stem(self) -> str:
        return f"importance_bagnet{self.bagnet.rf}"

    def compute(self) -> None:
        started = time.perf_counter()
        train, test = age_cohorts(self.preset, self.seed)
        preset, best_rf = self.preset, self.bagnet.rf
        fitted = self.bagnet.age_net()
        age_std = float(np.std(train.targets["age"]))

        def predictor(x: Tensor) -> Tensor:  # years; the fitted net predicts standardised age
            return fitted.model(x) * fitted.scale + fitted.shift

        config = r3d.ImportanceConfig(
            steps=preset.noise_steps, batch_size=preset.batch_size, lr=3e-3, lam=0.05,
            max_std=2.0, target_scale=age_std, seed=self.seed,
        )  # fmt: skip
        age_tr = torch.tensor(train.targets["age"]).float().unsqueeze(1)
        for p in fitted.model.parameters():
            p.requires_grad_(False)
        start = time.perf_counter()
        model, history = r3d.fit_noise_model(predictor, train.x, age_tr, config)
        maps = r3d.importance_maps(model, test.x).numpy()
        brain = test.mask.numpy()
        # per subject: its own (deformed) ageing map; population: the template's, in the brain
        per_subject = [
            r3d.importance_auc(m, lab > 0, b)
            for m, lab, b in zip(maps, test.labels, brain, strict=True)
        ]
        template = _template()
        population = maps.mean(0)
        common = brain.mean(0) > 0.5
        row = {
            "section": "importance",
            "method": f"noise model on BagNet-{best_rf}",
            "auc_population": r3d.importance_auc(population, template > 0, common),
            "auc_ventricles": r3d.importance_auc(population, template == 1, common),
            "auc_cortex": r3d.importance_auc(population, template == 2, common),
            "auc_subject_mean": float(np.mean(per_subject)),
            "mean_noise_scale": history[-1]["mean_scale"],
            "seconds": time.perf_counter() - start,
        }
        self.finish({"row": row}, {"population": torch.from_numpy(population)}, started=started)


def importance_run(bagnets: list[BagnetRun]) -> ImportanceRun:
    """The noise-model run on the finished BagNet run of the lowest age MAE."""
    best = min(bagnets, key=lambda run: run.record()["row"]["age_mae"])
    return ImportanceRun(folder=best.folder, preset=best.preset, seed=best.seed, bagnet=best)


def collect_importance(run: ImportanceRun, test: Cohort, bag: dict[str, Any]) -> dict[str, Any]:
    """The noise model's row and map, and the BagNet local maps' importance (|Pearson r|
    between local prediction and age over the test subjects) with their scores."""
    rows = [run.record()["row"]]
    population = run.load_tensors()["population"].numpy()
    template = _template()
    common = test.mask.numpy().mean(0) > 0.5
    age_te = test.targets["age"]
    bag_maps = {}
    for rf, local in bag["local_maps"].items():
        # where local predictions track age across subjects: |Pearson r| per location,
        # resampled onto the input grid
        lc = local - local.mean(0)
        ac = (age_te - age_te.mean())[:, None, None, None]
        corr = (lc * ac).sum(0) / np.sqrt((lc**2).sum(0) * (ac**2).sum() + 1e-12)
        up = r3d.upsample_to_input(np.abs(corr), 8, population.shape, test.affine)
        bag_maps[rf] = up
        rows.append(
            {
                "section": "importance",
                "method": f"BagNet-{rf} local map |r(local, age)|",
                "auc_population": r3d.importance_auc(up, template > 0, common),
                "auc_ventricles": r3d.importance_auc(up, template == 1, common),
                "auc_cortex": r3d.importance_auc(up, template == 2, common),
                "auc_subject_mean": None,
                "mean_noise_scale": None,
                "seconds": None,
            }
        )
    return {
        "rows": rows,
        "population": population,
        "template": template,
        "bag_maps": bag_maps,
        "best_rf": run.bagnet.rf,
    }

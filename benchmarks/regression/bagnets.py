"""Section (a): 3D BagNets of receptive field 9 / 17 / 33 / 177 predicting age and sex on
``brain_age``, with the local age maps the figures and section (c) reuse."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

import regression3d as r3d

from .cohort import Cohort
from .config import PAPER_BAGNET, RECEPTIVE_FIELDS, Preset

__all__ = ["run_bagnets"]


def run_bagnets(preset: Preset, seed: int, train: Cohort, test: Cohort) -> dict[str, Any]:
    """Age and sex BagNets per receptive field: metrics, local maps and trained age nets."""
    age_tr, age_te = torch.tensor(train.targets["age"]).float(), test.targets["age"]
    sex_tr, sex_te = torch.tensor(train.targets["sex"]).long(), test.targets["sex"]
    rows, local_maps, models = [], {}, {}
    config = r3d.TrainConfig(
        steps=preset.bagnet_steps, batch_size=preset.batch_size, lr=preset.lr, seed=seed
    )
    for rf in RECEPTIVE_FIELDS:
        start = time.perf_counter()
        torch.manual_seed(seed)
        age_net = r3d.fit(r3d.bagnet3d(rf, width=preset.bagnet_width), train.x, age_tr, config)
        torch.manual_seed(seed)
        sex_net = r3d.fit(
            r3d.bagnet3d(rf, width=preset.bagnet_width, out_features=2),
            train.x, sex_tr, config, task="classification",
        )  # fmt: skip
        pred_tr = age_net.predict(train.x)[0][:, 0].numpy()
        pred_te = age_net.predict(test.x)[0][:, 0].numpy()
        report = r3d.brain_age_report(age_tr.numpy(), pred_tr, age_te, pred_te)
        sex_pred = sex_net.predict(test.x)[0].argmax(1).numpy()
        with torch.no_grad():
            # local age maps in years: the head at every location, then the target scaling
            local = age_net.model.local_map(test.x)[:, 0] * age_net.scale + age_net.shift
        local_maps[rf] = local.numpy()
        models[rf] = age_net
        rows.append(
            {
                "section": "bagnet",
                "receptive_field": rf,
                "measured_receptive_field": age_net.model.receptive_field,
                "age_mae": report["raw"]["mae"],
                "age_mae_corrected": report["corrected"]["mae"],
                "age_rmse": report["raw"]["rmse"],
                "age_r": report["raw"]["r"],
                "age_r2": report["raw"]["r2"],
                "gap_age_r_raw": report["raw"]["gap_age_r"],
                "gap_age_r_corrected": report["corrected"]["gap_age_r"],
                "sex_accuracy": r3d.accuracy(sex_te, sex_pred),
                "paper_age_mae": PAPER_BAGNET[rf][0],
                "paper_sex_accuracy": PAPER_BAGNET[rf][1] / 100,
                "seconds": time.perf_counter() - start,
            }
        )
    baseline = {
        "section": "bagnet_baseline",
        "age_mae": r3d.mae(age_te, np.full_like(age_te, age_tr.mean().item())),
        "sex_accuracy": max(float(np.mean(sex_te)), 1 - float(np.mean(sex_te))),
    }
    return {"rows": rows, "baseline": baseline, "local_maps": local_maps, "models": models}

"""Section (a): 3D BagNets of receptive field 9 / 17 / 33 / 177 predicting age and sex on
``brain_age``, with the local age maps the figures and section (c) reuse.

One run per receptive field (:class:`BagnetRun`): its age and sex nets, their metrics,
the local age maps of the test subjects and the age net itself (section (c) reads it)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import regression3d as r3d
from dwp.train_log import optional_tensorboard

from .cohort import Cohort, age_cohorts
from .config import PAPER_BAGNET, RECEPTIVE_FIELDS, Preset
from .runs import Run

__all__ = ["BagnetRun", "bagnet_runs", "collect_bagnets"]


@dataclass(frozen=True, kw_only=True)
class BagnetRun(Run):
    """The age and sex BagNets of receptive field ``rf``; with ``tensorboard``, each fit
    logs into ``tensorboard/bagnet/rf<rf>_<age|sex>``."""

    rf: int

    def stem(self) -> str:
        return f"bagnet_rf{self.rf}"

    def compute(self) -> None:
        started = time.perf_counter()
        train, test = age_cohorts(self.preset, self.seed)
        preset, seed, rf, tensorboard = self.preset, self.seed, self.rf, self.tensorboard
        age_tr, age_te = torch.tensor(train.targets["age"]).float(), test.targets["age"]
        sex_tr, sex_te = torch.tensor(train.targets["sex"]).long(), test.targets["sex"]
        config = r3d.TrainConfig(
            steps=preset.bagnet_steps, batch_size=preset.batch_size, lr=preset.lr, seed=seed,
            device=self.device, amp=self.amp,
        )  # fmt: skip
        start = time.perf_counter()
        torch.manual_seed(seed)
        net = r3d.bagnet3d(rf, width=preset.bagnet_width)
        with optional_tensorboard(tensorboard, "bagnet", f"rf{rf}_age", purge_step=0) as logger:
            age_net = r3d.fit(net, train.x, age_tr, config, logger=logger)
        torch.manual_seed(seed)
        net = r3d.bagnet3d(rf, width=preset.bagnet_width, out_features=2)
        with optional_tensorboard(tensorboard, "bagnet", f"rf{rf}_sex", purge_step=0) as logger:
            sex_net = r3d.fit(net, train.x, sex_tr, config, task="classification", logger=logger)
        pred_tr = age_net.predict(train.x)[0][:, 0].numpy()
        pred_te = age_net.predict(test.x)[0][:, 0].numpy()
        report = r3d.brain_age_report(age_tr.numpy(), pred_tr, age_te, pred_te)
        sex_pred = sex_net.predict(test.x)[0].argmax(1).numpy()
        with torch.no_grad():
            # local age maps in years: the head at every location, then the target scaling
            local = age_net.model.local_map(test.x.to(self.device))[:, 0].cpu()
            local = local * age_net.scale + age_net.shift
        row = {
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
        tensors = {
            "local_map": local,
            "age_net": {k: v.cpu() for k, v in age_net.model.state_dict().items()},
            "shift": age_net.shift,
            "scale": age_net.scale,
        }
        self.finish({"row": row}, tensors, started=started)

    def age_net(self) -> r3d.FittedModel:
        """The finished run's trained age net (eval mode)."""
        saved = self.load_tensors()
        net = r3d.bagnet3d(self.rf, width=self.preset.bagnet_width)
        net.load_state_dict(saved["age_net"])
        return r3d.FittedModel(net.eval(), "regression", saved["shift"], saved["scale"])


def bagnet_runs(
    preset: Preset, seed: int, folder: Path, tensorboard: Path | None = None
) -> list[BagnetRun]:
    """One run per receptive field."""
    return [
        BagnetRun(folder=folder, preset=preset, seed=seed, tensorboard=tensorboard, rf=rf)
        for rf in RECEPTIVE_FIELDS
    ]


def collect_bagnets(runs: list[BagnetRun], train: Cohort, test: Cohort) -> dict[str, Any]:
    """The finished runs' rows, the training-mean baseline and the local maps (in years, by
    receptive field), for the report, the figures and section (c)."""
    age_tr, age_te = train.targets["age"], test.targets["age"]
    sex_te = test.targets["sex"]
    baseline = {
        "section": "bagnet_baseline",
        "age_mae": r3d.mae(
            age_te, np.full_like(age_te, torch.tensor(age_tr).float().mean().item())
        ),
        "sex_accuracy": max(float(np.mean(sex_te)), 1 - float(np.mean(sex_te))),
    }
    rows = [run.record()["row"] for run in runs]
    local_maps = {run.rf: run.load_tensors()["local_map"].numpy() for run in runs}
    return {"rows": rows, "baseline": baseline, "local_maps": local_maps}

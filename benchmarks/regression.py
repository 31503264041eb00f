"""Regression benchmark: 3D BagNets, Hydranet and importance maps on the synthetic cohorts.

Three sections, on 4 mm volumes of the offline MNI152-based cohorts (:mod:`cohorts`):

(a) **BagNet receptive field** 9 / 17 / 33 / 177: age MAE and sex accuracy on ``brain_age``,
    in the layout of Pawlowski & Glocker's table, with local-map figures of the youngest and
    the oldest test subject;
(b) **Hydranet** vs its base regressor, the base regressor with an N(0, 1) prior and with a
    deep weight prior (fitted on the 3x3x3 kernels of regressors trained on the ``ms_source``
    cohort's lesion count and volume), on ``lesion_count`` count and volume with 12-30
    training subjects: MSE and ICC(2,1), several seeds;
(c) **Importance maps**: a noise model (Bintsi et al. 2021) on the frozen best age BagNet,
    scored by AUC against the known ageing map, next to the BagNet local maps' AUC.

Usage::

    python -m benchmarks.regression --preset quick --seed 0       # ~20-30 min on 2 cores
    python -m benchmarks.regression --preset ci --out /tmp/reg    # a minute: pipeline check
    dwp-regression --preset full

Writes ``regression.json`` / ``regression.md`` (``regression_<preset>.*`` for presets other
than quick) and ``regression_local_maps.png``, ``regression_hydranet.png``,
``regression_importance.png`` into ``--out`` (default ``benchmarks/results``).

Honest small-scale caveats: tiny widths and a few hundred steps on CPU, synthetic anatomy
where sex changes brain size only, so numbers are not comparable with the papers' (which
are given beside them for the layout only).
"""

from __future__ import annotations

import argparse
import io
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import cohorts
import dwp
import regression3d as r3d
from cohorts.ageing import ageing_map
from dwp._io import atomic_write

from .report import DEFAULT_OUT_DIR, markdown_table, write_results

__all__ = ["PRESETS", "Preset", "main", "parse_args"]

RESOLUTION = 4
#: crops of the 4 mm template grid (50 x 59 x 48): the brain with a margin for the random
#: deformation (brain_age), the white matter where lesions are placed (lesion_count)
AGE_CROP = (slice(5, 45), slice(5, 53), slice(0, 40))
LESION_CROP = (slice(8, 40), slice(8, 48), slice(4, 36))
RECEPTIVE_FIELDS = (9, 17, 33, 177)
#: Pawlowski & Glocker (2019) on CamCAN, for the layout (age MAE in years, sex accuracy %)
PAPER_BAGNET = {9: (5.53, 83.2), 17: (5.32, 84.0), 33: (4.98, 84.0), 177: (3.86, 80.9)}
METHODS = ("base", "hydranet", "base_normal_prior", "base_dwp")


@dataclass(frozen=True)
class Preset:
    """Sizes of one benchmark run."""

    age_train: int
    age_test: int
    bagnet_width: int
    bagnet_steps: int
    lesion_sizes: tuple[int, ...]
    lesion_test: int
    seeds: int
    regressor_widths: tuple[int, ...]
    regressor_steps: int
    source_subjects: int
    source_nets: int
    vae_epochs: int
    noise_steps: int
    batch_size: int = 4
    beta: float = 0.01
    lr: float = 1e-3


PRESETS: dict[str, Preset] = {
    "ci": Preset(
        age_train=6, age_test=4, bagnet_width=1, bagnet_steps=2,
        lesion_sizes=(12,), lesion_test=4, seeds=1, regressor_widths=(2, 2),
        regressor_steps=2, source_subjects=6, source_nets=2, vae_epochs=2, noise_steps=2,
        batch_size=2,
    ),
    # Settings measured on this machine (age MAE of BagNet-33 on the quick cohort; the
    # training-mean baseline is 17.0): width 2, 150 steps at lr 1e-3: 12.3; width 2, 300
    # steps at 3e-3: 7.1; width 4, 300 steps at 3e-3: 5.6 (59 s per network).
    "quick": Preset(
        age_train=48, age_test=24, bagnet_width=4, bagnet_steps=300,
        lesion_sizes=(12, 24), lesion_test=24, seeds=2, regressor_widths=(8, 16),
        regressor_steps=300, source_subjects=24, source_nets=2, vae_epochs=30, noise_steps=80,
        lr=3e-3,
    ),
    "full": Preset(
        age_train=120, age_test=60, bagnet_width=4, bagnet_steps=600,
        lesion_sizes=(12, 18, 24, 30), lesion_test=60, seeds=3, regressor_widths=(16, 32),
        regressor_steps=400, source_subjects=60, source_nets=3, vae_epochs=100, noise_steps=300,
    ),
}  # fmt: skip


# -- data ---------------------------------------------------------------------------------
@dataclass
class Cohort:
    """Cropped images ``(N, 1, D, H, W)``, brain masks, targets and ageing labels."""

    x: Tensor
    mask: Tensor
    targets: dict[str, np.ndarray]
    labels: np.ndarray
    affine: np.ndarray


def _crop_affine(affine: np.ndarray, crop: tuple[slice, ...]) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in crop]
    return affine @ shift


def load_cohort(
    name: str, n: int, split: str, seed: int, crop: tuple[slice, ...], scaling: str
) -> Cohort:
    """``n`` subjects of a cohort in memory, cropped and intensity-normalised.

    ``scaling``: ``"zscore"`` inside the brain (brain age) or ``"minmax"`` to [0, 1] (lesion
    count: Hydranet's zero images are then black images, as in the paper).
    """
    images, masks, labels, targets = [], [], [], {}
    for i in range(n):
        s = cohorts.subject(name, i, resolution=RESOLUTION, seed=seed, split=split)
        brain = sum(s["tissues"].values()) > 0.5
        images.append(s["image"][crop])
        masks.append(brain[crop])
        labels.append(s["label"][crop])
        # ms_source is a segmentation cohort, but its subjects carry count and volume too
        keys = cohorts.COHORTS[name].targets or ("count", "volume_mm3")
        for key in keys:
            value = s["meta"][key]
            targets.setdefault(key, []).append(
                1.0 if value == "F" else 0.0 if value == "M" else value
            )
    x = torch.from_numpy(np.stack(images)).float().unsqueeze(1)
    mask = torch.from_numpy(np.stack(masks)).unsqueeze(1)
    if scaling == "zscore":
        x = r3d.standardise_images(x, mask) * mask
    else:
        low = x.amin(dim=(2, 3, 4), keepdim=True)
        high = x.amax(dim=(2, 3, 4), keepdim=True)
        x = (x - low) / (high - low).clamp_min(1e-8)
    affine = _crop_affine(np.asarray(s["affine"]), crop)
    return Cohort(
        x, mask[:, 0], {k: np.asarray(v) for k, v in targets.items()}, np.stack(labels), affine
    )


# -- (a) BagNets ----------------------------------------------------------------------------
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


# -- (b) Hydranet ---------------------------------------------------------------------------
def _lesion_targets(c: Cohort) -> Tensor:
    return torch.tensor(np.stack([c.targets["count"], c.targets["volume_mm3"]], 1)).float()


def fit_source_prior(preset: Preset, seed: int) -> tuple[dwp.DeepWeightPrior, dict[str, Any]]:
    """Deep weight prior on the 3x3x3 kernels of base regressors trained on ``ms_source``
    (MS-like lesions: their count and volume), one VAE for all layers."""
    source = load_cohort(
        "ms_source", preset.source_subjects, "train", seed + 1000, LESION_CROP, "minmax"
    )
    y = torch.tensor(np.stack([source.targets["count"], source.targets["volume_mm3"]], 1)).float()
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
    fit = prior.metadata["fits"]["all"]
    info = {
        "kernels": len(bank),
        "vae_val_elbo": fit["best_val_elbo"],
        "gaussian_full": fit["baselines"]["full"],
        "gaussian_diagonal": fit["baselines"]["diagonal"],
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


# -- (c) importance -------------------------------------------------------------------------
def run_importance(
    preset: Preset, seed: int, train: Cohort, test: Cohort, bag: dict[str, Any]
) -> dict[str, Any]:
    """Noise-model importance of the best age BagNet vs BagNet local-map importance."""
    best_rf = min(bag["rows"], key=lambda row: row["age_mae"])["receptive_field"]
    fitted = bag["models"][best_rf]
    age_std = float(np.std(train.targets["age"]))

    def predictor(x: Tensor) -> Tensor:  # years; the fitted net predicts standardised age
        return fitted.model(x) * fitted.scale + fitted.shift

    config = r3d.ImportanceConfig(
        steps=preset.noise_steps, batch_size=preset.batch_size, lr=3e-3, lam=0.05,
        max_std=2.0, target_scale=age_std, seed=seed,
    )  # fmt: skip
    age_tr = torch.tensor(train.targets["age"]).float().unsqueeze(1)
    for p in fitted.model.parameters():
        p.requires_grad_(False)
    start = time.perf_counter()
    model, history = r3d.fit_noise_model(predictor, train.x, age_tr, config)
    maps = r3d.importance_maps(model, test.x).numpy()
    brain = test.mask.numpy()
    # per subject: its own (deformed) ageing map; population: the template's, inside the brain
    per_subject = [
        r3d.importance_auc(m, lab > 0, b)
        for m, lab, b in zip(maps, test.labels, brain, strict=True)
    ]
    template = ageing_map(cohorts.load_anatomy(RESOLUTION))[AGE_CROP]
    population = maps.mean(0)
    common = brain.mean(0) > 0.5
    rows = [
        {
            "section": "importance",
            "method": f"noise model on BagNet-{best_rf}",
            "auc_population": r3d.importance_auc(population, template > 0, common),
            "auc_ventricles": r3d.importance_auc(population, template == 1, common),
            "auc_cortex": r3d.importance_auc(population, template == 2, common),
            "auc_subject_mean": float(np.mean(per_subject)),
            "mean_noise_scale": history[-1]["mean_scale"],
            "seconds": time.perf_counter() - start,
        }
    ]
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
        "best_rf": best_rf,
    }


# -- figures --------------------------------------------------------------------------------
def _save_figure(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    with atomic_write(path) as f:
        f.write(buffer.getvalue())


def plot_local_maps(test: Cohort, bag: dict[str, Any], path: Path) -> None:
    """Youngest and oldest test subject: mid axial slice and age maps per receptive field."""
    from matplotlib.figure import Figure

    ages = test.targets["age"]
    rows = [int(np.argmin(ages)), int(np.argmax(ages))]
    fig = Figure(figsize=(2.2 * (1 + len(RECEPTIVE_FIELDS)), 4.6))
    axes = fig.subplots(2, 1 + len(RECEPTIVE_FIELDS))
    z = test.x.shape[-1] // 2
    for r, i in enumerate(rows):
        axes[r, 0].imshow(test.x[i, 0, :, :, z].numpy().T, cmap="gray", origin="lower")
        axes[r, 0].set_title(f"age {ages[i]:.0f}", fontsize=9)
        for c, rf in enumerate(RECEPTIVE_FIELDS, start=1):
            local = bag["local_maps"][rf][i]
            up = r3d.upsample_to_input(local, 8, tuple(test.x.shape[2:]), test.affine)
            axes[r, c].imshow(test.x[i, 0, :, :, z].numpy().T, cmap="gray", origin="lower")
            im = axes[r, c].imshow(up[:, :, z].T, cmap="magma", origin="lower", alpha=0.6)
            axes[r, c].set_title(f"RF {rf}: mean {local.mean():.0f}", fontsize=9)
            fig.colorbar(im, ax=axes[r, c], fraction=0.046, pad=0.02)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle("BagNet local age predictions (years), youngest and oldest test subject")
    _save_figure(fig, path)


def plot_hydranet(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6.5))
    axes = fig.subplots(2, 2)
    for r, target in enumerate(("count", "volume_mm3")):
        for c, metric in enumerate(("mse", "icc")):
            ax = axes[r, c]
            for method in METHODS:
                sel = [x for x in rows if x["method"] == method and x["target"] == target]
                sizes = sorted({x["n_train"] for x in sel})
                values = [[x[metric] for x in sel if x["n_train"] == n] for n in sizes]
                ax.errorbar(
                    sizes, [np.mean(v) for v in values], yerr=[np.std(v) for v in values],
                    marker="o", capsize=3, label=method,
                )  # fmt: skip
            ax.set_xlabel("training subjects")
            ax.set_ylabel(f"{target} {metric.upper()}")
            if metric == "mse":
                ax.set_yscale("log")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("lesion_count: Hydranet vs base regressor (mean +- sd over seeds)")
    fig.tight_layout()
    _save_figure(fig, path)


def plot_importance(test: Cohort, imp: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    z = test.x.shape[-1] // 2
    panels = [
        ("mean test image", test.x[:, 0, :, :, z].mean(0).numpy(), "gray"),
        ("ageing map (1 ventricles, 2 cortex)", imp["template"][:, :, z], "viridis"),
        (f"noise-model importance (BagNet-{imp['best_rf']})", imp["population"][:, :, z], "magma"),
    ] + [(f"BagNet-{rf} |r(local, age)|", m[:, :, z], "magma") for rf, m in imp["bag_maps"].items()]
    fig = Figure(figsize=(2.6 * len(panels), 3.2))
    axes = fig.subplots(1, len(panels))
    for ax, (title, image, cmap) in zip(axes, panels, strict=True):
        im = ax.imshow(np.asarray(image).T, cmap=cmap, origin="lower")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    _save_figure(fig, path)


# -- report ---------------------------------------------------------------------------------
def _f(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_markdown(
    preset_name: str, bag: dict[str, Any], hydra: list[dict[str, Any]], prior_info: dict[str, Any],
    imp: dict[str, Any], wall: float,
) -> str:  # fmt: skip
    rows = bag["rows"]
    parts = [
        f"Preset `{preset_name}`, wall time {wall / 60:.1f} min.",
        "## (a) BagNet receptive field: age and sex on `brain_age`",
        markdown_table(
            [
                "receptive field",
                "age MAE (years)",
                "age MAE, bias-corrected",
                "age r",
                "sex accuracy (%)",
                "paper age MAE",
                "paper sex accuracy (%)",
            ],
            [
                [
                    r["receptive_field"],
                    _f(r["age_mae"]),
                    _f(r["age_mae_corrected"]),
                    _f(r["age_r"]),
                    _f(100 * r["sex_accuracy"], 1),
                    _f(r["paper_age_mae"]),
                    _f(100 * r["paper_sex_accuracy"], 1),
                ]
                for r in rows
            ]
            + [
                [
                    "predict the training mean / majority sex",
                    _f(bag["baseline"]["age_mae"]),
                    "-",
                    "-",
                    _f(100 * bag["baseline"]["sex_accuracy"], 1),
                    "-",
                    "-",
                ]
            ],
        ),
        "Bias correction: `pred - (a - 1) age - b` with `pred = a age + b` fitted on the "
        "training subjects only. Paper columns: Pawlowski & Glocker 2019 on CamCAN (652 "
        "real T1 scans, 1 mm), for the layout only.",
        "## (b) Hydranet vs base regressor on `lesion_count` (mean +- sd over seeds)",
    ]
    table = []
    for target in ("count", "volume_mm3"):
        for n in sorted({x["n_train"] for x in hydra}):
            for method in METHODS:
                sel = [
                    x
                    for x in hydra
                    if x["method"] == method and x["target"] == target and x["n_train"] == n
                ]
                mse_v, icc_v = [x["mse"] for x in sel], [x["icc"] for x in sel]
                table.append(
                    [target, n, method, f"{np.mean(mse_v):.4g} +- {np.std(mse_v):.2g}",
                     f"{np.mean(icc_v):.2f} +- {np.std(icc_v):.2f}", _f(np.mean([x["epistemic_sd"] for x in sel]), 3)]
                )  # fmt: skip
    parts.append(
        markdown_table(
            ["target", "training subjects", "method", "test MSE", "ICC(2,1)", "epistemic sd"], table
        )
    )
    parts.append(
        f"ICC(2,1): two-way random, absolute agreement (Shrout & Fleiss). One network predicts "
        f"both targets. DWP: one kernel VAE on {prior_info['kernels']} 3x3x3 kernels of "
        f"regressors trained on `ms_source`; held-out ELBO {prior_info['vae_val_elbo']:.1f} "
        f"nats per kernel vs {prior_info['gaussian_full']:.1f} (full-covariance Gaussian) and "
        f"{prior_info['gaussian_diagonal']:.1f} (diagonal)."
    )
    parts.append("## (c) Importance maps vs the ground-truth ageing map (AUC inside the brain)")
    parts.append(
        markdown_table(
            [
                "method",
                "AUC population map",
                "AUC ventricles",
                "AUC cortex",
                "AUC per subject (mean)",
            ],
            [
                [
                    x["method"],
                    _f(x["auc_population"], 3),
                    _f(x["auc_ventricles"], 3),
                    _f(x["auc_cortex"], 3),
                    _f(x["auc_subject_mean"], 3),
                ]
                for x in imp["rows"]
            ],
        )
    )
    return "\n\n".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dwp-regression", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads (default: torch's, all cores; use 1 when the machine is shared)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(
        ["python", "-m", "benchmarks.regression", *(sys.argv[1:] if argv is None else argv)]
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        return _run(args, command)
    finally:  # a caller (a test, a notebook) keeps its own setting
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, command: str) -> int:
    preset = PRESETS[args.preset]
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.perf_counter

    t = stamp()
    age_train = load_cohort("brain_age", preset.age_train, "train", args.seed, AGE_CROP, "zscore")
    age_test = load_cohort("brain_age", preset.age_test, "test", args.seed, AGE_CROP, "zscore")
    lesion_pool = load_cohort(
        "lesion_count", max(preset.lesion_sizes), "train", args.seed, LESION_CROP, "minmax"
    )
    lesion_test = load_cohort(
        "lesion_count", preset.lesion_test, "test", args.seed, LESION_CROP, "minmax"
    )
    timings = {"data": stamp() - t}
    print(f"data {timings['data']:.0f} s", flush=True)

    t = stamp()
    bag = run_bagnets(preset, args.seed, age_train, age_test)
    timings["bagnet"] = stamp() - t
    print(f"bagnets {timings['bagnet']:.0f} s", flush=True)
    t = stamp()
    prior, prior_info = fit_source_prior(preset, args.seed)
    hydra = run_hydranet(preset, args.seed, prior, lesion_test, lesion_pool)
    timings["hydranet"] = stamp() - t
    print(f"hydranet {timings['hydranet']:.0f} s", flush=True)
    t = stamp()
    imp = run_importance(preset, args.seed, age_train, age_test, bag)
    timings["importance"] = stamp() - t
    print(f"importance {timings['importance']:.0f} s", flush=True)

    suffix = "" if args.preset == "quick" else f"_{args.preset}"
    plot_local_maps(age_test, bag, out / f"regression{suffix}_local_maps.png")
    plot_hydranet(hydra, out / f"regression{suffix}_hydranet.png")
    plot_importance(age_test, imp, out / f"regression{suffix}_importance.png")
    wall = time.perf_counter() - start
    timings["total"] = wall
    markdown = render_markdown(args.preset, bag, hydra, prior_info, imp, wall)
    rows = bag["rows"] + [bag["baseline"]] + hydra + imp["rows"]
    config = {
        "preset": args.preset, **asdict(preset), "seed": args.seed, "threads": torch.get_num_threads(),
        "resolution_mm": RESOLUTION, "dwp_prior": prior_info, "timings_s": timings,
    }  # fmt: skip
    write_results(f"regression{suffix}", config, rows, markdown, out, command=command)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What the optimiser-path benchmark compares, and its presets.

Every run is the transfer benchmark's setting (:mod:`benchmarks.transfer`): its data,
source network and deep weight prior (the cached stages are shared), ``size`` target
training volumes of split ``k``, its step budget and validation schedule.  What changes
between runs is only how the posterior is optimised (:data:`PATHS`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["BASELINES", "PATHS", "PRESETS", "OptimiserPath", "Preset"]


@dataclass(frozen=True)
class OptimiserPath:
    """One way to optimise the variational U-Net.

    ``optimizer`` and ``options`` go to :class:`unet3d.config.TrainConfig` (``scale_rate``)
    and the strategy (``scale_lr``, as a multiple of the learning rate); ``ivon`` paths
    train a plain U-Net whose posterior the optimiser keeps (:class:`dwp.optim.IVON`).
    """

    name: str
    label: str
    optimizer: str
    scale_rate: float = 0.1
    scale_lr_factor: float | None = None
    priors: tuple[str, ...] = ("normal_prior", "dwp")


PATHS: dict[str, OptimiserPath] = {
    p.name: p
    for p in (
        OptimiserPath(
            "adam_tenth",
            "Adam, scales at lr / 10 (the earlier default)",
            "adam",
            scale_lr_factor=0.1,
        ),
        OptimiserPath("adam", "Adam, scales at lr", "adam", scale_lr_factor=1.0),
        OptimiserPath("natural", "natural-gradient scales, rate 0.1 (the default)", "natural", 0.1),
        OptimiserPath("natural_fast", "natural-gradient scales, rate 0.3", "natural", 0.3),
        # IVON's prior is the Gaussian of its weight decay: the N(0, 1) control only
        OptimiserPath(
            "ivon", "IVON (its own posterior, prior N(0, 1))", "ivon", priors=("normal_prior",)
        ),
    )
}

#: Uncertainty without a learned posterior, on the fine-tuned network (PR).
BASELINES = ("softmax entropy", "test-time augmentation")


@dataclass(frozen=True)
class Preset:
    """Settings of a run of the benchmark.

    ``transfer``: the :data:`benchmarks.transfer.PRESETS` entry whose data, source net,
    prior, crop, step budget and learning rate are used; ``size`` target training volumes;
    ``splits``; ``methods`` the variational strategies; ``paths`` (:data:`PATHS`); ``beta``
    the KL weight and ``init`` the posterior means' start (the transfer benchmark's
    validation chose 1e-3 and the source network for both priors); ``eval_samples``
    posterior samples per test volume; ``elbo_samples`` weight samples of the final ELBO
    estimate on the training volumes; IVON's learning rate and curvature momentum
    (``ivon_lr``, ``ivon_beta2``: the paper's 0.99999 assumes 10^5 steps, not 80);
    ``timing_rounds`` of the step-time section; ``n_test`` test volumes (``None``: all);
    ``dice_weight`` the ELBO data term's Dice weight per voxel
    (:func:`unet3d.losses.elbo_data_term`): 1e-3, the weight the committed results were
    measured with, where the library's default is now 1 (the all-background trap).
    """

    transfer: str = "single_source"
    size: int = 5
    splits: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = ("normal_prior", "dwp")
    paths: tuple[str, ...] = tuple(PATHS)
    beta: float = 1e-3
    init: str = "pretrained"
    eval_samples: int = 4
    elbo_samples: int = 4
    ivon_lr: float = 0.1
    ivon_beta2: float = 0.9
    timing_rounds: int = 10
    n_test: int | None = None
    dice_weight: float = 1e-3

    def __post_init__(self) -> None:
        unknown = set(self.paths) - set(PATHS)
        if unknown:
            raise ValueError(f"unknown paths {sorted(unknown)}; choose from {list(PATHS)}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")

    def replace(self, **changes: Any) -> Preset:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, Preset] = {
    "quick": Preset(),
    # the pipeline on tiny volumes (the numbers mean nothing); a test runs it
    "ci": Preset(
        transfer="ci", size=2, splits=(0,), eval_samples=2, elbo_samples=1, timing_rounds=2
    ),
}

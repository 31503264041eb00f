"""The cache key of every stage, built from the :class:`~.config.Preset` fields that
declare it (:func:`~.config.setting`) and the keys of the stages it reads from.

Stages: ``source`` (the source nets), ``prior`` (the deep weight prior, fitted on the
source kernels) and one per method (its runs, ``runs/<method>-<hash>/``).  A key holds
the upstream stages by their hashes rather than their file paths, so machines with other
folders agree on it (``--merge``); keys are computed without touching any file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..stages import digest
from .config import BAYESIAN, PRIOR, RUNS, SOURCE, Preset

#: The data each stage reads (:func:`~.data.data_key`'s entries).
STAGE_DATA = {SOURCE: "source", **dict.fromkeys(RUNS, "target")}
#: Strategy options that name another stage's file, and that stage.
OPTION_STAGES = {"source": SOURCE, "prior_path": PRIOR}
#: What a stage computes, beyond its settings: bump a stage's number when its code changes
#: its results or its files (a key holds settings, not code, so an old folder would
#: otherwise be reused silently).  prior 2: the held-out fit report of
#: ``DeepWeightPrior.fit`` (3-way split, IWAE); Bayesian runs 2: the natural-gradient
#: optimiser, fan-in initial scales and the per-voxel Dice weight of the ELBO.  Source 2,
#: prior 3, runs 3: SWAG moments and kernel displacement of the source nets, the kernel
#: Gaussian and SWAG priors, per-volume uncertainty scores in every run's record.  Bayesian
#: runs 4: the ELBO's data term is the deterministic loss summed (Dice weight 1 per voxel,
#: was 1e-3: the all-background trap, :mod:`unet3d.losses`).
STAGE_VERSIONS: dict[str, int] = {
    SOURCE: 2,
    PRIOR: 3,
    **dict.fromkeys(RUNS, 3),
    **dict.fromkeys(BAYESIAN, 4),
}


def strategy_options(
    preset: Preset,
    method: str,
    sources: Mapping[str, Any] | None = None,
    prior: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``method``'s options for :func:`unet3d.strategies.get_strategy` (of its strategy,
    :data:`~.config.STRATEGY_OF`); the file paths are ``None`` without ``sources`` /
    ``prior`` (their stage summaries)."""
    source = None if sources is None else sources["nets"][0]["best"]

    def bayesian(beta: float, init: str, prior_file: str | None = None) -> dict[str, Any]:
        options: dict[str, Any] = {"beta": beta}
        if prior_file is not None:
            options["prior_path"] = None if prior is None else prior[prior_file]
        if init == "pretrained":
            return {**options, "init": init, "source": source}
        # N(0, 1) has no samples to start from: "fresh" is its strategy's own default
        return options if prior_file is None else {**options, "init": init}

    if method in ("pretrained", "pretrained_frozen", "l2_sp"):
        options: dict[str, Any] = {"source": source}
        if method == "pretrained_frozen":
            options["freeze_depth"] = preset.freeze_depth
        if method == "l2_sp":
            options["alpha"] = preset.l2sp_alpha
        return options
    if method == "normal_prior":
        return bayesian(preset.normal_beta, preset.normal_init)
    if method == "dwp":
        return bayesian(preset.dwp_beta, preset.dwp_init, "prior")
    if method == "kernel_gaussian":
        return bayesian(preset.kg_beta, preset.learned_init, "kernel_gaussian_prior")
    if method == "swag":
        options = bayesian(preset.swag_beta, preset.learned_init, "swag_prior")
        return {**options, "prior_options": {"scale": preset.swag_scale}}
    return {}


def upstream(preset: Preset, stage: str) -> tuple[str, ...]:
    """The stages whose outputs ``stage`` reads: the prior reads the source nets, a
    method's runs the stages whose files their strategy options name."""
    if stage == SOURCE:
        return ()
    if stage == PRIOR:
        return (SOURCE,)
    options = strategy_options(preset, stage)
    return tuple(OPTION_STAGES[name] for name in options if name in OPTION_STAGES)


def stage_key(preset: Preset, stage: str, seed: int, data: Mapping[str, Any]) -> dict[str, Any]:
    """Everything ``stage``'s results depend on: the seed, the data it reads (``data``:
    :func:`~.data.data_key`), the hashes of its upstream stages' keys and the preset
    fields that declare it (:meth:`~.config.Preset.settings`), and its code's version
    (:data:`STAGE_VERSIONS`)."""
    key: dict[str, Any] = {"stage": stage, "version": STAGE_VERSIONS[stage], "seed": seed}
    if stage in STAGE_DATA:
        key["data"] = dict(data[STAGE_DATA[stage]])
    key["upstream"] = {s: digest(stage_key(preset, s, seed, data)) for s in upstream(preset, stage)}
    key["settings"] = preset.settings(stage)
    # mixed precision changes what a training stage computes; "off" adds nothing, so the
    # float32 keys (and the caches made before the option existed) stay as they were
    if preset.amp != "off" and stage != PRIOR:
        key["amp"] = preset.amp
    # likewise the runs' output bias: the bias-free runs' keys stay as they were
    if preset.out_bias and stage in RUNS:
        key["out_bias"] = True
    return key

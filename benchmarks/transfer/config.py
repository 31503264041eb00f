"""The benchmark's settings: the methods, :class:`Preset` and its presets, ``--set``.

Each :class:`Preset` field declares the cached stages whose results it changes
(:func:`setting`); the stage keys (:mod:`.keys`) are built from these declarations, so a
new field is part of the right keys as soon as it is declared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dwp.amp import check_precision
from dwp.devices import resolve_device

from ..stages import logger

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

#: The cached stages: the source nets, the prior, and the runs of each method (one
#: stage per method: its run folder ``runs/<method>-<hash>``).
SOURCE, PRIOR = "source", "prior"
STAGES = (SOURCE, PRIOR, *METHODS)
#: The runs of every method.
RUNS = METHODS

log = logger("transfer")


def setting(default: Any, *, stages: tuple[str, ...]) -> Any:
    """A :class:`Preset` field whose value goes into the keys of ``stages`` (the stages
    that read it; ``()``: it only shapes the grid, the selection or the report)."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {list(STAGES)}")
    return field(default=default, metadata={"stages": tuple(stages)})


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
    Uncertainty (per test voxel, :func:`unet3d.metrics.voxel_uncertainty`): of the test
    prediction, except for a Bayesian method whose ``eval_samples`` is 0, scored on
    ``uncertainty_samples`` more posterior samples (0: the posterior means' one pass, no
    mutual information); the deterministic methods are also scored with test-time
    augmentation (the left-right mirror: two more passes per test volume) at the train
    sizes ``tta_sizes``.
    Selection: each Bayesian method's KL weight and initialisation are chosen jointly from
    ``beta_grid`` x ``dwp_init_grid`` (``normal_init_grid``) by the validation Dice of the
    smallest training set, split 0; an empty grid leaves its setting as it is.

    Where it computes: ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``) trains the source
    nets and the runs and fits the prior; it is no stage's setting (a device does not change
    what is computed: a cached stage is reused on another).  ``amp`` (``"off"``,
    ``"bf16"``, ``"fp16"``: :mod:`dwp.amp`) changes the numbers of every training stage and
    is in their keys when not ``"off"`` (:func:`~.keys.stage_key`).

    Each field names the stages it changes (``stages=``, see :func:`setting`).
    """

    resolution: int = setting(4, stages=(SOURCE, *RUNS))
    crop: tuple[int, int, int] = setting((40, 48, 40), stages=(SOURCE, PRIOR, *RUNS))
    widths: tuple[int, ...] = setting((16, 32, 32, 64), stages=(SOURCE, PRIOR, *RUNS))
    n_source: int = setting(24, stages=(SOURCE,))
    n_source_val: int = setting(4, stages=(SOURCE,))
    pool: int = setting(20, stages=RUNS)
    n_val: int = setting(4, stages=RUNS)
    n_test: int = setting(50, stages=RUNS)
    sizes: tuple[int, ...] = setting((5, 10, 15, 20), stages=())
    splits: int = setting(3, stages=())
    methods: tuple[str, ...] = setting(METHODS, stages=())
    source_nets: int = setting(1, stages=(SOURCE,))
    source_epochs: int = setting(20, stages=(SOURCE,))
    source_restarts: int = setting(1, stages=(SOURCE,))
    source_patience: int = setting(3, stages=(SOURCE,))
    vae_epochs: int = setting(100, stages=(PRIOR,))
    vae_hidden: int = setting(32, stages=(PRIOR,))
    vae_architecture: str = setting("mlp", stages=(PRIOR,))
    latent_dim: int = setting(6, stages=(PRIOR,))
    kernel_min_norm: float = setting(0.0, stages=(PRIOR,))
    steps: int = setting(80, stages=RUNS)
    val_every_steps: int = setting(10, stages=RUNS)
    epochs: int = setting(500, stages=RUNS)
    lr: float = setting(1e-3, stages=(SOURCE, *RUNS))
    patience: int = setting(10, stages=RUNS)
    min_lr: float = setting(1e-6, stages=(SOURCE, *RUNS))
    dwp_beta: float = setting(1e-3, stages=("dwp",))
    normal_beta: float = setting(1e-3, stages=("normal_prior",))
    beta_grid: tuple[float, ...] = setting((1e-4, 1e-3, 1e-2), stages=())
    dwp_init: str = setting("prior", stages=("dwp",))
    normal_init: str = setting("fresh", stages=("normal_prior",))
    dwp_init_grid: tuple[str, ...] = setting(("prior", "pretrained"), stages=())
    normal_init_grid: tuple[str, ...] = setting(("fresh", "pretrained"), stages=())
    freeze_depth: int = setting(1, stages=("pretrained_frozen",))
    eval_samples: int = setting(0, stages=BAYESIAN)
    uncertainty_samples: int = setting(2, stages=BAYESIAN)
    tta_sizes: tuple[int, ...] = setting(
        (5,), stages=("pretrained", "pretrained_frozen", "random_init")
    )
    device: str = setting("cpu", stages=())
    amp: str = setting("off", stages=())

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
        if self.device != "cpu" or self.amp != "off":  # one line naming the option
            object.__setattr__(self, "device", str(resolve_device(self.device, "device")))
            check_precision(self.amp, self.device, "amp")

    def replace(self, **changes: Any) -> Preset:
        return dataclasses.replace(self, **changes)

    def settings(self, stage: str) -> dict[str, Any]:
        """The fields that declare ``stage`` (:func:`setting`), by name: what it reads."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; choose from {list(STAGES)}")
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if stage in f.metadata["stages"]
        }


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
        tta_sizes=(2,),
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


def override(preset: Preset, assignments: Sequence[str]) -> Preset:
    """``preset`` with ``--set name=value`` assignments (tuples: comma-separated values)."""
    names = {f.name for f in dataclasses.fields(Preset)}
    changes: dict[str, Any] = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep or name not in names:
            raise ValueError(f"--set {item!r}: expected name=value with name in {sorted(names)}")
        current = getattr(preset, name)
        if isinstance(current, tuple):
            element = type(current[0]) if current else str
            changes[name] = tuple(element(v) for v in value.split(",") if v)
        else:
            changes[name] = type(current)(value)
    return preset.replace(**changes)

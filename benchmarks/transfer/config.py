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

#: Methods: the learned priors first, then their controls, in the report's column order.
METHODS = (
    "dwp",
    "kernel_gaussian",
    "swag",
    "normal_prior",
    "l2_sp",
    "pretrained",
    "pretrained_frozen",
    "random_init",
)
LABELS = {
    "dwp": "UNet-DWP",
    "kernel_gaussian": "UNet-KG",
    "swag": "UNet-SWAG",
    "normal_prior": "UNet-N(0,1)",
    "l2_sp": "UNet-L2SP",
    "pretrained": "UNet-PR",
    "pretrained_frozen": "UNet-PRf",
    "random_init": "UNet-RI",
}
#: What each method is, for the report.
DESCRIPTIONS = {
    "dwp": "variational U-Net, deep weight prior (kernel VAEs fitted on the source kernels)",
    "kernel_gaussian": "variational U-Net, full-covariance Gaussian per kernel group fitted "
    "on the same source kernels",
    "swag": "variational U-Net, source-trajectory prior (SWAG moments of the source run, "
    "Shwartz-Ziv et al. 2022)",
    "normal_prior": "variational U-Net, N(0, 1) prior (the Bayesian control)",
    "l2_sp": "fine-tuning pulled towards the source weights (L2-SP)",
    "pretrained": "fine-tuning every layer of the source net (PR)",
    "pretrained_frozen": "fine-tuning with the middle blocks frozen (PRf)",
    "random_init": "He-initialised U-Net (RI)",
}
BAYESIAN = ("dwp", "kernel_gaussian", "swag", "normal_prior")
#: The :mod:`unet3d.strategies` strategy of each method (its own name where absent).
STRATEGY_OF = {"kernel_gaussian": "prior", "swag": "prior"}
#: Where the posterior means of each Bayesian method may start (``Preset.*_init``).
INITS = {
    "dwp_init": ("prior", "fresh", "pretrained"),
    "normal_init": ("fresh", "pretrained"),
    "learned_init": ("fresh", "pretrained"),
}
#: The two transfer regimes: the target cohort of each (:mod:`cohorts`).  ``near``: the
#: source's anatomy and contrast logic, a bright lesion on T2 (fine-tuning helps);
#: ``far``: the same tumours on a T1-like contrast in which they are dark (the source's
#: bright-lesion features do not fit; the paper's regime, PR no better than RI).
REGIMES = {"near": "tumour_target", "far": "tumour_t1"}

#: The cached stages: the source nets, the priors, and the runs of each method (one
#: stage per method: its run folder ``runs/<method>-<hash>``).
SOURCE, PRIOR = "source", "prior"
STAGES = (SOURCE, PRIOR, *METHODS)
#: The runs of every method.
RUNS = METHODS
#: The learning rate field of each method (the others train at ``Preset.lr``).
LR_OF = {"random_init": "ri_lr", "pretrained": "pr_lr", "pretrained_frozen": "prf_lr"}
#: Methods that train at another method's learning rate: the priors and L2-SP are
#: fine-tuning plus a penalty, so they take the rate chosen for fine-tuning (Adam's, on
#: the posterior means) and spend their validation runs on their strength.
LR_FROM = {m: "pretrained" for m in (*BAYESIAN, "l2_sp")}

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
    and ``n_source_val`` source subjects; ``regime`` the target (:data:`REGIMES`) and
    ``regimes`` those the command runs, one after the other; ``pool`` target training
    subjects to draw the subsets from, ``n_val`` target validation and ``n_test`` test
    subjects.
    Source nets: ``source_nets`` networks (seeds ``seed * 1000 + k``) trained for at most
    ``source_epochs`` epochs per cycle with ``source_restarts`` cyclical restarts; every
    cycle's final network is a kernel set.  Net 0 also collects its trajectory's SWAG
    moments (``swag_rank`` deviation columns, a snapshot every ``swag_every`` steps from
    epoch ``swag_start`` of its last cycle), the source-trajectory prior.
    Priors: one kernel VAE per resolution group (``vae_*``, ``latent_dim``) and one
    full-covariance Gaussian per group, on the same kernels (L2 norm below
    ``kernel_min_norm`` dropped).
    Target runs: ``steps`` optimiser steps per run whatever the training size (epochs
    ``= ceil(steps / batches per epoch)``, so small sets are not trained for less), or the
    paper's epoch budget when ``steps`` is 0; the ReduceLROnPlateau patience in epochs;
    validation every ``val_every_steps`` steps (0: every epoch).  Learning rates: ``lr``
    (the source nets), ``ri_lr``, ``prf_lr`` and ``pr_lr``, which the priors and L2-SP
    share (:data:`LR_FROM`: they are fine-tuning plus a penalty); ``l2sp_alpha`` the L2-SP
    strength; ``*_beta`` the KL weights (the data term is the deterministic loss summed
    over voxels, :func:`unet3d.losses.elbo_data_term`; 1 is the plain ELBO, and SWAG's
    strength is tuned by its scale at that weight); ``dwp_init`` how DWP posterior means start
    (``"prior"``: samples of the prior, the original paper's DWP initialisation;
    ``"fresh"``: He init; ``"pretrained"``: the source network's weights, as fine-tuning
    does), ``normal_init`` the same for the N(0, 1) control and ``learned_init`` for the
    kernel-Gaussian and SWAG priors (``"fresh"`` or ``"pretrained"``); ``freeze_depth``
    of PRf; ``eval_samples`` posterior samples averaged at test time (0: posterior means).
    Uncertainty (per test voxel, :func:`unet3d.metrics.voxel_uncertainty`): of the test
    prediction, except for a Bayesian method whose ``eval_samples`` is 0, scored on
    ``uncertainty_samples`` more posterior samples (0: the posterior means' one pass, no
    mutual information); the deterministic methods are also scored with test-time
    augmentation (the left-right mirror: two more passes per test volume) at the train
    sizes ``tta_sizes``.
    Selection (:mod:`.selection`): every method's strength is chosen by the validation
    Dice of the smallest training set, split 0, from a grid of the same length: the
    learning rate of RI, PR and PRf from ``lr_grid`` (first: the priors and L2-SP then
    train at PR's), L2-SP's ``alpha_grid``, each
    Bayesian method's KL weight from ``beta_grid`` (jointly with ``dwp_init_grid`` /
    ``normal_init_grid`` when given), but the SWAG prior's scale ``swag_scale`` (the
    factor of its covariance, as in Pre-Train Your Loss) from ``swag_scale_grid``: a
    source trajectory's weights vary by about 1 % of their size, so unscaled that prior
    pins every weight; an empty grid leaves its setting as it is.
    Statistics: ``bootstrap`` replicates of every confidence interval.

    Network: the paper's U-Net at ``widths``; ``out_bias`` gives every target run's
    output conv a bias (the source nets have none; they load with it at zero): without
    it a run can get stuck predicting background everywhere (:mod:`unet3d.losses`), and
    every method gets it, so the comparison stays between like networks.

    Where it computes: ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``) trains the source
    nets and the runs and fits the prior; it is no stage's setting (a device does not change
    what is computed: a cached stage is reused on another).  ``amp`` (``"off"``,
    ``"bf16"``, ``"fp16"``: :mod:`dwp.amp`) changes the numbers of every training stage and
    is in their keys when not ``"off"`` (:func:`~.keys.stage_key`).

    Each field names the stages it changes (``stages=``, see :func:`setting`).
    """

    resolution: int = setting(4, stages=(SOURCE, *RUNS))
    crop: tuple[int, int, int] = setting((32, 40, 32), stages=(SOURCE, PRIOR, *RUNS))
    widths: tuple[int, ...] = setting((8, 16, 16, 32), stages=(SOURCE, PRIOR, *RUNS))
    out_bias: bool = setting(True, stages=())  # in the runs' keys when True: stage_key
    n_source: int = setting(24, stages=(SOURCE,))
    n_source_val: int = setting(4, stages=(SOURCE,))
    regime: str = setting("near", stages=RUNS)
    regimes: tuple[str, ...] = setting(("near", "far"), stages=())
    pool: int = setting(10, stages=RUNS)
    n_val: int = setting(4, stages=RUNS)
    n_test: int = setting(20, stages=RUNS)
    sizes: tuple[int, ...] = setting((5, 10), stages=())
    splits: int = setting(5, stages=())
    methods: tuple[str, ...] = setting(METHODS, stages=())
    source_nets: int = setting(3, stages=(SOURCE,))
    source_epochs: int = setting(40, stages=(SOURCE,))
    source_restarts: int = setting(2, stages=(SOURCE,))
    source_patience: int = setting(3, stages=(SOURCE,))
    swag_rank: int = setting(5, stages=(SOURCE, PRIOR))
    swag_start: int = setting(5, stages=(SOURCE,))
    swag_every: int = setting(4, stages=(SOURCE,))
    vae_epochs: int = setting(100, stages=(PRIOR,))
    vae_hidden: int = setting(32, stages=(PRIOR,))
    vae_architecture: str = setting("mlp", stages=(PRIOR,))
    latent_dim: int = setting(6, stages=(PRIOR,))
    kernel_min_norm: float = setting(0.0, stages=(PRIOR,))
    steps: int = setting(40, stages=RUNS)
    val_every_steps: int = setting(10, stages=RUNS)
    epochs: int = setting(500, stages=RUNS)
    lr: float = setting(1e-3, stages=(SOURCE, *RUNS))
    ri_lr: float = setting(1e-3, stages=("random_init",))
    pr_lr: float = setting(1e-3, stages=("pretrained", "l2_sp", *BAYESIAN))
    prf_lr: float = setting(1e-3, stages=("pretrained_frozen",))
    lr_grid: tuple[float, ...] = setting((3e-4, 1e-3, 3e-3, 1e-2, 3e-2), stages=())
    l2sp_alpha: float = setting(1e-2, stages=("l2_sp",))
    alpha_grid: tuple[float, ...] = setting((1e-4, 1e-3, 1e-2, 1e-1, 1.0), stages=())
    patience: int = setting(10, stages=RUNS)
    min_lr: float = setting(1e-6, stages=(SOURCE, *RUNS))
    dwp_beta: float = setting(0.1, stages=("dwp",))
    kg_beta: float = setting(0.1, stages=("kernel_gaussian",))
    swag_beta: float = setting(1.0, stages=("swag",))
    swag_scale: float = setting(1e3, stages=("swag",))
    swag_scale_grid: tuple[float, ...] = setting((1e2, 1e3, 1e4, 1e5, 1e6), stages=())
    normal_beta: float = setting(0.1, stages=("normal_prior",))
    beta_grid: tuple[float, ...] = setting((1e-3, 1e-2, 0.1, 1.0, 10.0), stages=())
    dwp_init: str = setting("pretrained", stages=("dwp",))
    normal_init: str = setting("pretrained", stages=("normal_prior",))
    learned_init: str = setting("pretrained", stages=("kernel_gaussian", "swag"))
    dwp_init_grid: tuple[str, ...] = setting((), stages=())
    normal_init_grid: tuple[str, ...] = setting((), stages=())
    freeze_depth: int = setting(1, stages=("pretrained_frozen",))
    eval_samples: int = setting(2, stages=BAYESIAN)
    uncertainty_samples: int = setting(0, stages=BAYESIAN)
    tta_sizes: tuple[int, ...] = setting(
        (), stages=("pretrained", "pretrained_frozen", "random_init", "l2_sp")
    )
    bootstrap: int = setting(2000, stages=())
    device: str = setting("cpu", stages=())
    amp: str = setting("off", stages=())

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
        for name in (self.regime, *self.regimes):
            if name not in REGIMES:
                raise ValueError(f"unknown regime {name!r}; choose from {list(REGIMES)}")
        if max(self.sizes) > self.pool:
            raise ValueError(f"train size {max(self.sizes)} exceeds the target pool {self.pool}")
        if min(self.sizes) < 2:
            raise ValueError("train sizes must be >= 2 (batch 2, as in the paper)")
        for name, allowed in INITS.items():
            for value in (getattr(self, name), *getattr(self, f"{name}_grid", ())):
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
    # Both regimes on a 2-core CPU in at most 30 minutes from a fresh clone, with the
    # committed source artefact (benchmarks/artefacts): 4 mm volumes cropped to 32x40x32,
    # the paper's U-Net at half width, 5 splits at 5 and 10 volumes, 40 optimiser steps
    # per run, every method's strength chosen from 5 validation runs (grids spanning four
    # decades, or two for learning rates), 2 posterior samples per test prediction of a
    # Bayesian net.
    "quick": Preset(),
    # The earlier quick preset, one source net on the paper's U-Net, near transfer only:
    # the setting of the variational-learning benchmark (benchmarks.variational).
    "single_source": Preset(
        crop=(40, 48, 40),
        widths=(16, 32, 32, 64),
        regimes=("near",),
        pool=20,
        n_test=50,
        sizes=(5, 10, 15, 20),
        splits=3,
        methods=("dwp", "normal_prior", "pretrained", "pretrained_frozen", "random_init"),
        out_bias=False,  # as its committed runs were trained
        source_nets=1,
        source_epochs=20,
        source_restarts=1,
        steps=80,
        lr_grid=(),
        dwp_init="prior",
        normal_init="fresh",
        dwp_init_grid=("prior", "pretrained"),
        normal_init_grid=("fresh", "pretrained"),
        eval_samples=0,
        uncertainty_samples=2,
        tta_sizes=(5,),
    ),
    # Smoke test: every stage and file, tiny everything (the numbers mean nothing).
    "ci": Preset(
        widths=(4, 8, 8, 8),
        n_source=4,
        n_source_val=2,
        pool=3,
        n_val=2,
        n_test=3,
        sizes=(2, 3),
        splits=2,
        source_nets=1,
        source_epochs=1,
        source_restarts=1,
        swag_rank=2,
        swag_start=0,
        swag_every=1,
        vae_epochs=2,
        steps=2,
        val_every_steps=0,
        lr_grid=(1e-3,),
        alpha_grid=(1e-2,),
        beta_grid=(0.1, 1.0),
        swag_scale_grid=(1e3,),
        tta_sizes=(2,),
        bootstrap=200,
    ),
    # Train to convergence on a CPU: the quick preset's volumes, network and committed
    # source artefact, every run trained until ReduceLROnPlateau reaches its floor (at
    # most 300 epochs; the rate cut tenfold after 3 validations without progress), a pool
    # of 20 so that the 10-volume subsets differ between splits, TTA scored at both sizes.
    "full": Preset(pool=20, steps=0, epochs=300, patience=3, tta_sizes=(5, 10)),
    # The paper's sizes and schedule (for a GPU): 2 mm volumes, 10 source nets, train to
    # convergence (ReduceLROnPlateau to the floor, at most 500 epochs).
    "paper": Preset(
        resolution=2,
        crop=(96, 112, 96),
        widths=(16, 32, 32, 64),
        n_source=170,
        n_source_val=20,
        pool=20,
        n_val=10,
        n_test=50,
        sizes=(5, 10, 15, 20),
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
        elif isinstance(current, bool):  # bool("false") is True
            if value.lower() not in _BOOLEANS:
                raise ValueError(f"--set {item!r}: {name} is true or false, got {value!r}")
            changes[name] = _BOOLEANS[value.lower()]
        else:
            changes[name] = type(current)(value)
    return preset.replace(**changes)


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}

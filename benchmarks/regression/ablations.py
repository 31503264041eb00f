"""Section (d), with ``--ablations``: Hydranet's explanations tested one at a time.

Each :class:`Ablation` changes one setting of section (b)'s base regressor or Hydranet and
trains it on the smallest training size with (b)'s repetitions: the same training
subjects and initial weights, so each row is compared *paired* with (b)'s base regressor
and Hydranet of the same repetition.  Every variant x repetition is one run
(:class:`AblationRun`, a :class:`~benchmarks.regression.hydranet.HydraRun` with the
changes), resumable and sent wherever ``--engine`` sends the others.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import Tensor

import regression3d as r3d

from ..report import markdown_table
from .cohort import Cohort, lesion_cohorts
from .config import RESOLUTION, Preset
from .hydranet import HydraRun
from .report import mean_ci_text

__all__ = [
    "ABLATIONS",
    "Ablation",
    "AblationRun",
    "ablation_runs",
    "render_ablations",
    "select_ablations",
]


@dataclass(frozen=True)
class Ablation:
    """One change to (b)'s setting.

    Attributes
    ----------
    name, question
        The row's label and the explanation it tests.
    method
        ``"base"`` or ``"hydranet"``.
    steps, lr, sets_per_step
        ``None``: the preset's.
    optimizer
        :attr:`regression3d.TrainConfig.optimizer`.
    set_size, p_zero, centre
        Hydranet's sets (:class:`regression3d.HydraConfig`).
    augment
        Train on :class:`regression3d.RigidAugmentation` batches (the paper's flips,
        rotations and translations).
    resolution
        Voxel size in mm of the images (the same subjects and lesion counts; 2 mm costs
        8x the voxels).
    seeds
        Repetitions (``None``: the preset's); fewer for the costliest variants.
    """

    name: str
    question: str
    method: str = "hydranet"
    steps: int | None = None
    lr: float | None = None
    optimizer: str = "auto"
    set_size: int = 4
    p_zero: float = 0.1
    centre: bool = False
    sets_per_step: int | None = None
    augment: bool = False
    resolution: int = RESOLUTION
    seeds: int | None = None

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_")


ABLATIONS: tuple[Ablation, ...] = (
    Ablation(
        "base, 300 steps at lr 3e-3", "does the base need (b)'s longer training?",
        method="base", steps=300, lr=3e-3,
    ),
    Ablation(
        "sets of 1", "is the set machinery sound? (a set of one image is the base)",
        set_size=1, p_zero=0.0,
    ),
    Ablation(
        "one set per step", "equal images per step instead of the paper's epochs",
        sets_per_step=1,
    ),
    Ablation("centred sums", "centred set targets (a zero image = the mean)", centre=True),
    Ablation("no zero images", "zeroing probability p = 0", p_zero=0.0),
    Ablation("sets of 2", "set size 2 (pairs)", set_size=2),
    Ablation(
        "base, Adadelta + augmentation", "the paper's optimiser and augmentation",
        method="base", optimizer="adadelta", lr=1.0, augment=True,
    ),
    Ablation(
        "Hydranet, Adadelta + augmentation", "the paper's optimiser and augmentation",
        optimizer="adadelta", lr=1.0, augment=True,
    ),
    Ablation("Hydranet, lr 3e-4", "a smaller learning rate (b: 1e-3)", lr=3e-4),
    Ablation("Hydranet, lr 3e-3", "a larger learning rate (b: 1e-3)", lr=3e-3),
    Ablation(
        "base at 2 mm", "do lesions need a finer grid? (one seed: 8x the voxels)",
        method="base", resolution=2, seeds=1,
    ),
    Ablation(
        "Hydranet at 2 mm", "do lesions need a finer grid? (one seed: 8x the voxels)",
        resolution=2, seeds=1,
    ),
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class AblationRun(HydraRun):
    """(b)'s ``method`` at ``n_train`` subjects and repetition ``rep``, with ``ablation``'s
    changes."""

    ablation: Ablation

    def stem(self) -> str:
        return f"ablation_{self.ablation.slug}_n{self.n_train}_seed{self.seed + self.rep}"

    def train_config(self, run_seed: int) -> r3d.TrainConfig:
        a = self.ablation
        config = super().train_config(run_seed)
        steps = a.steps or config.steps
        config = replace(
            config, steps=steps, lr=a.lr or config.lr, optimizer=a.optimizer,
            kl_warmup=steps // 2,
        )  # fmt: skip
        if self.method == "hydranet":
            hydra = r3d.HydraConfig(
                a.set_size, a.p_zero, centre=a.centre,
                sets_per_step=a.sets_per_step or self.preset.hydranet_sets_per_step,
            )  # fmt: skip
            config = replace(config, hydranet=hydra)
        return config

    def augmentation(self, run_seed: int) -> Callable[[Tensor], Tensor] | None:
        return r3d.RigidAugmentation(seed=run_seed) if self.ablation.augment else None

    def cohorts(self) -> tuple[Cohort, Cohort]:
        return lesion_cohorts(self.preset, self.seed, self.ablation.resolution)

    def cost(self) -> float:
        return super().cost() * (RESOLUTION / self.ablation.resolution) ** 3

    def row_labels(self) -> dict[str, Any]:
        return {"section": "ablation", "ablation": self.ablation.name}


def select_ablations(names: Sequence[str] | None = None) -> tuple[Ablation, ...]:
    """The ablations whose :attr:`Ablation.slug` is in ``names`` (all when empty or
    ``None``), in :data:`ABLATIONS`' order.

    Raises
    ------
    ValueError
        If a name is not an ablation's slug (the message lists them).
    """
    slugs = [a.slug for a in ABLATIONS]
    unknown = sorted(set(names or ()) - set(slugs))
    if unknown:
        raise ValueError(
            f"--ablations: unknown {', '.join(unknown)}; choose from {', '.join(slugs)}"
        )
    return tuple(a for a in ABLATIONS if not names or a.slug in names)


def ablation_runs(
    preset: Preset, seed: int, folder: Path, ablations: Sequence[Ablation] = ABLATIONS
) -> list[AblationRun]:
    """Each of ``ablations`` x repetition (the preset's, at most :attr:`Ablation.seeds`)
    at the preset's smallest training size."""
    return [
        AblationRun(
            folder=folder,
            preset=preset,
            seed=seed,
            n_train=min(preset.lesion_sizes),
            rep=rep,
            method=a.method,
            ablation=a,
        )
        for a in ablations
        for rep in range(min(preset.seeds, a.seeds or preset.seeds))
    ]


def render_ablations(rows: list[dict[str, Any]], reference: list[dict[str, Any]]) -> str:
    """Section (d)'s table: each ablation's lesion-count ICC, paired with (b)'s base and
    Hydranet of the same repetitions (``reference``: section (b)'s rows)."""
    count = [r for r in rows if r["target"] == "count"]
    if not count:
        return ""
    n = count[0]["n_train"]
    ref = {
        (r["method"], r["seed"]): r
        for r in reference
        if r["target"] == "count" and r["n_train"] == n
    }
    table = []
    questions = {a.name: a.question for a in ABLATIONS}
    # in ABLATIONS' order; a row of a variant no longer defined is dropped
    for name in (a.name for a in ABLATIONS if any(r["ablation"] == a.name for r in count)):
        sel = [r for r in count if r["ablation"] == name]
        question = questions[name]

        def paired(method: str, sel: list[dict[str, Any]] = sel) -> str:
            diff = [
                r["icc"] - ref[(method, r["seed"])]["icc"]
                for r in sel
                if (method, r["seed"]) in ref
            ]
            return mean_ci_text(diff) if diff else "-"

        table.append(
            [
                name,
                question,
                len(sel),
                mean_ci_text([r["icc"] for r in sel]),
                paired("base"),
                paired("hydranet"),
                mean_ci_text([r["train_icc"] for r in sel]),
                f"{sum(r['seconds'] for r in sel) / len(sel):.0f}",
            ]
        )
    for method, label in (("base", "(b) base"), ("hydranet", "(b) Hydranet")):
        sel = [r for (m, _), r in ref.items() if m == method]
        if sel:
            table.append(
                [label, "the reference", len(sel), mean_ci_text([r["icc"] for r in sel]),
                 "-", "-", mean_ci_text([r["train_icc"] for r in sel]),
                 f"{sum(r['seconds'] for r in sel) / len(sel):.0f}"]
            )  # fmt: skip
    header = [
        "variant", "question", "seeds", "test ICC", "minus (b) base (paired)",
        "minus (b) Hydranet (paired)", "train ICC", "s per run",
    ]  # fmt: skip
    return (
        f"Lesion count, {n} training subjects, mean [95% CI] over seeds; each variant "
        f"changes one setting of (b) and keeps (b)'s training subjects and initial weights "
        f"per seed, hence the paired columns.\n\n" + markdown_table(header, table)
    )

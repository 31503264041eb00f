"""What a regression benchmark run measures and at which size: the fixed grid, crops,
receptive fields and methods, and the :class:`Preset` sizes ``ci`` / ``quick`` / ``full``."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AGE_CROP",
    "LESION_CROP",
    "LESION_SCALING",
    "METHODS",
    "PAPER_BAGNET",
    "PRESETS",
    "RECEPTIVE_FIELDS",
    "RESOLUTION",
    "Preset",
]

RESOLUTION = 4
#: crops of the 4 mm template grid (50 x 59 x 48): the brain with a margin for the random
#: deformation (brain_age), the white matter where lesions are placed (lesion_count)
AGE_CROP = (slice(5, 45), slice(5, 53), slice(0, 40))
LESION_CROP = (slice(8, 40), slice(8, 48), slice(4, 36))
#: lesion_count intensity scaling (:func:`~benchmarks.regression.cohort.load_cohort`): the
#: white-matter background at 0, so that the few lesion voxels are what the network sees
LESION_SCALING = "background"
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
    #: :class:`regression3d.BaseRegressor`'s ``feature_scale`` (lesion regressors)
    feature_scale: float = 100.0
    #: learning rate of the lesion regressors (``lr`` is the BagNets')
    regressor_lr: float = 1e-3
    #: Hydranet's sets per step: ``batch_size`` of them (each of 4 images) gives it, per
    #: step, the paper's epoch ratio (an epoch of N training images is N sets for
    #: Hydranet, N images for the base regressor), i.e. 4x the base's images per step
    hydranet_sets_per_step: int = 4
    #: training sizes of the two Bayesian methods (``None``: every one of
    #: ``lesion_sizes``); a prior matters most at the smallest
    bayesian_sizes: tuple[int, ...] | None = None


PRESETS: dict[str, Preset] = {
    "ci": Preset(
        age_train=6, age_test=4, bagnet_width=1, bagnet_steps=2,
        lesion_sizes=(12,), lesion_test=4, seeds=1, regressor_widths=(2, 2),
        regressor_steps=2, source_subjects=6, source_nets=2, vae_epochs=2, noise_steps=2,
        batch_size=2, hydranet_sets_per_step=1,
    ),
    # Settings measured on this machine (age MAE of BagNet-33 on the quick cohort; the
    # training-mean baseline is 17.0): width 2, 150 steps at lr 1e-3: 12.3; width 2, 300
    # steps at 3e-3: 7.1; width 4, 300 steps at 3e-3: 5.6 (59 s per network).  Lesion
    # count (base, 12 subjects, seed 0, 300 steps at 3e-3): test ICC 0.01 with min-max
    # images and feature_scale 1, 0.02 with feature_scale 100 (train ICC 0.57), 0.63 with
    # the background scaling and feature_scale 100 (see regression.md, the ablations);
    # 300 steps learn in some seeds only (seeds 1, 2: 0.00, 0.13), 600 at lr 1e-3 in all
    # (0.82, 0.83, 0.80; 3e-3: 0.72, 0.66).
    "quick": Preset(
        age_train=48, age_test=24, bagnet_width=4, bagnet_steps=300,
        lesion_sizes=(12, 24), lesion_test=24, seeds=3, regressor_widths=(8, 16),
        regressor_steps=600, source_subjects=24, source_nets=2, vae_epochs=30, noise_steps=80,
        lr=3e-3, bayesian_sizes=(12,),
    ),
    "full": Preset(
        age_train=120, age_test=60, bagnet_width=4, bagnet_steps=600,
        lesion_sizes=(12, 18, 24, 30), lesion_test=60, seeds=3, regressor_widths=(16, 32),
        regressor_steps=800, source_subjects=60, source_nets=3, vae_epochs=100, noise_steps=300,
    ),
}  # fmt: skip

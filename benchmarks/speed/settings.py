"""What the speed benchmark measures against and how much work a run does.

The targets and the fixed parts of the method (warm-ups, learning rates, limits) are the
same for every run; everything a ``--quick`` smoke run shrinks is a field of
:class:`Settings`, with one instance for a full run (:data:`FULL`) and one for a quick run
(:data:`QUICK`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ADAM_LR",
    "FIT_SOURCES",
    "FIT_TARGET_S",
    "FULL",
    "GPU_AMP_SIZE",
    "GPU_AMP_TARGET",
    "GPU_BAYES_TARGET",
    "GPU_KL_SHARE_TARGET",
    "HEAVY_WARMUP_STEPS",
    "INFERENCE_OVERLAP",
    "KL_TARGET",
    "LAYER_TARGETS",
    "MIN_REPORT_STEPS",
    "MIN_SIZE",
    "QUICK",
    "SECTIONS",
    "SGD_LR",
    "STRATEGY_N_DATA",
    "WARMUP_STEPS",
    "Settings",
]

SECTIONS = ("layers", "kl", "fit", "unet3d", "precision")

# -- targets --------------------------------------------------------------------------------
#: Largest acceptable ratio of median step times, Bayesian / deterministic, per estimator.
LAYER_TARGETS: dict[str, float] = {"reparam": 1.25, "local_reparam": 2.3, "flipout": 2.5}
#: Largest acceptable (KL bound forward + backward) / (deterministic training step), MLP VAE.
KL_TARGET = 0.10
#: Largest acceptable wall time of the VAE fit (seconds).
FIT_TARGET_S = 120.0
#: The precision section's targets, judged on a GPU only: Bayesian / deterministic step,
#: KL bound / step, float32 step / mixed-precision step (paper U-Net, GPU_AMP_SIZE^3, batch 2)
GPU_BAYES_TARGET = 1.10
GPU_KL_SHARE_TARGET = 0.05
GPU_AMP_TARGET = 1.8
GPU_AMP_SIZE = 128

# -- the same in every run ------------------------------------------------------------------
#: Fewer timed rounds give a median and IQR too noisy to compare against the targets.
MIN_REPORT_STEPS = 10
#: UNet3D's three stride-2 levels need a multiple of 8 and 2^3 voxels at the bottom.
MIN_SIZE = 16
WARMUP_STEPS = 2
HEAVY_WARMUP_STEPS = 1
SGD_LR = 1e-3
#: Untrained UNet3Ds the fit's kernels come from, at least (more when they hold too few).
FIT_SOURCES = 4
#: Training-set size N of the ELBO's N / B scaling (it changes the loss, not the cost).
STRATEGY_N_DATA = 10
ADAM_LR = 1e-3
INFERENCE_OVERLAP = 0.5


@dataclass(frozen=True)
class Settings:
    """How much work one kind of run does: everything ``--quick`` shrinks.

    No field has a default, so a setting added here must be given a value in both
    :data:`FULL` and :data:`QUICK`.  ``steps`` and ``size`` are the defaults of
    ``--steps`` and ``--size``.
    """

    #: Timed rounds per variant.
    steps: int
    #: Timed repetitions of the slow variants (4x wider U-Net step, conv VAE bound).
    heavy_reps: int
    #: Edge of the cubic input volume of the layers and kl sections.
    size: int
    widths: tuple[int, ...]
    #: The kl section's wider U-Net.
    wide_widths: tuple[int, ...]
    fit_epochs: int
    fit_kernels: int
    #: Edge of the unet3d section's training input (independent of ``--size``).
    strategy_size: int
    inference_volume: tuple[int, int, int]
    inference_roi: int
    #: Posterior samples of the Bayesian inference cases (the deterministic case makes 1 pass).
    inference_samples: tuple[int, ...]
    #: Edge of the precision section's input on the CPU (GPU_AMP_SIZE on a GPU).
    amp_size: int


FULL = Settings(
    steps=10,
    heavy_reps=3,
    size=48,
    widths=(16, 32, 32, 64),
    wide_widths=(64, 128, 128, 256),  # "4x wider": 16x the 3x3x3 kernels
    fit_epochs=50,
    fit_kernels=100_000,
    # the 64^3 training step and a BraTS-sized volume for sliding-window inference
    strategy_size=64,
    inference_volume=(240, 240, 155),
    inference_roi=64,
    inference_samples=(1, 8),
    amp_size=64,
)

QUICK = Settings(
    steps=3,
    heavy_reps=2,
    size=16,
    widths=(4, 8, 8, 16),
    wide_widths=(8, 16, 16, 32),  # 2x in the smoke run, to keep it fast
    fit_epochs=2,
    fit_kernels=3_000,
    strategy_size=16,
    inference_volume=(24, 24, 20),
    inference_roi=16,
    # one Bayesian case: every case costs a fresh interpreter (seconds of imports)
    inference_samples=(2,),
    amp_size=24,  # not 16: 2-voxel-deep feature maps hit a torch bf16 defect (dwp.amp)
)

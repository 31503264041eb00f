"""Optimiser paths of variational training compared: do the posterior scales learn, and
does it show in the ELBO, the Dice, the calibration and the error detection?

For the paper's U-Net on the transfer benchmark's quick setting (5 target training
volumes, 80 steps), the N(0, 1) and deep-weight-prior U-Nets are trained by each path of
:data:`PATHS` (Adam with the scales at a tenth of the learning rate, the earlier default;
Adam with the scales at the learning rate; :class:`dwp.optim.NaturalVI`, the default, at
two rates; IVON on the plain U-Net), against the fine-tuned network's softmax entropy and
test-time augmentation.  Reported: how far the log-scales moved, the final negative ELBO
on the training volumes, test Dice, voxel ECE / NLL / Brier and the error-detection AUROC
of the mutual information and the predictive entropy, and each path's step time against
plain Adam (target at most 1.2x)::

    python -m benchmarks.variational --seed 0               # the quick preset
    python -m benchmarks.variational --preset ci --out /tmp  # pipeline check
"""

from .cli import main, parse_args
from .config import PATHS, PRESETS, OptimiserPath, Preset

__all__ = ["PATHS", "PRESETS", "OptimiserPath", "Preset", "main", "parse_args"]

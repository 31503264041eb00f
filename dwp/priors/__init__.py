"""Weight priors.  Every prior implements ``kl(posterior) -> Tensor`` summed over the site."""

from .base import KLKind, Prior, PriorMismatchError
from .deep import DeepWeightPrior, DeepWeightSitePrior
from .files import PriorFileError, load_prior, save_prior
from .gaussian import NormalPrior, PretrainedNormalPrior, gaussian_kl
from .groups import KernelGroups
from .kernel_gaussian import KernelGaussianPrior, KernelGaussianSitePrior, fit_kernel_gaussian
from .log_uniform import LogUniformPrior
from .report import fit_report, held_out_scores, split_bank
from .swag import SWAGPrior, SWAGSitePrior, lowrank_gaussian_kl
from .weight_report import render_weight_scores, weight_scores

__all__ = [
    "DeepWeightPrior",
    "DeepWeightSitePrior",
    "KLKind",
    "KernelGaussianPrior",
    "KernelGaussianSitePrior",
    "KernelGroups",
    "LogUniformPrior",
    "NormalPrior",
    "PretrainedNormalPrior",
    "Prior",
    "PriorFileError",
    "PriorMismatchError",
    "SWAGPrior",
    "SWAGSitePrior",
    "fit_kernel_gaussian",
    "fit_report",
    "gaussian_kl",
    "held_out_scores",
    "load_prior",
    "lowrank_gaussian_kl",
    "render_weight_scores",
    "save_prior",
    "split_bank",
    "weight_scores",
]

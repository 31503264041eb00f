"""Weight priors.  Every prior implements ``kl(posterior) -> Tensor`` summed over the site."""

from .base import KLKind, Prior, PriorMismatchError
from .deep import DeepWeightPrior, DeepWeightSitePrior, PriorFileError
from .gaussian import NormalPrior, PretrainedNormalPrior, gaussian_kl
from .log_uniform import LogUniformPrior

__all__ = [
    "DeepWeightPrior",
    "DeepWeightSitePrior",
    "KLKind",
    "LogUniformPrior",
    "NormalPrior",
    "PretrainedNormalPrior",
    "Prior",
    "PriorFileError",
    "PriorMismatchError",
    "gaussian_kl",
]

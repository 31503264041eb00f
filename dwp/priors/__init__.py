"""Weight priors.  Every prior implements ``kl(posterior) -> Tensor`` summed over the site."""

from .base import KLKind, Prior, PriorMismatchError
from .gaussian import NormalPrior, PretrainedNormalPrior, gaussian_kl
from .log_uniform import LogUniformPrior

__all__ = [
    "KLKind",
    "LogUniformPrior",
    "NormalPrior",
    "PretrainedNormalPrior",
    "Prior",
    "PriorMismatchError",
    "gaussian_kl",
]

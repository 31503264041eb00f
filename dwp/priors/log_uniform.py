"""The log-uniform prior of sparse variational dropout (Molchanov et al. 2017)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..posterior import MeanFieldNormal
from .base import KLKind, Prior

__all__ = ["LogUniformPrior"]

# Constants of the fitted approximation, Molchanov et al. (2017), eq. 14.
_K1, _K2, _K3 = 0.63576, 1.87320, 1.48695


class LogUniformPrior(Prior):
    """The improper log-uniform prior p(|w|) ∝ 1 / |w|, a baseline in the DWP paper.

    Its KL to a Gaussian depends only on ``alpha = sigma^2 / mu^2`` and has no closed form;
    :meth:`kl` is the approximation of Molchanov et al. (2017),

        -KL ≈ k1 * sigmoid(k2 + k3 * log alpha) - 0.5 * log1p(1 / alpha) - k1,

    accurate to about 0.01 nats per weight, and neither an exact value nor a bound.

    Parameters
    ----------
    max_log_alpha
        ``log alpha`` is clipped to this value: beyond it a weight is pure noise and the KL is
        flat, and the clip keeps gradients finite.
    """

    kl_kind = KLKind.APPROXIMATION

    def __init__(self, max_log_alpha: float = 8.0) -> None:
        super().__init__()
        self.max_log_alpha = float(max_log_alpha)

    def log_alpha(self, posterior: MeanFieldNormal) -> Tensor:
        """``log(sigma^2 / mu^2)`` per weight, clipped at ``max_log_alpha``."""
        log_alpha = 2.0 * posterior.log_scale - torch.log(posterior.loc.pow(2) + 1e-16)
        return log_alpha.clamp(max=self.max_log_alpha)

    def kl(self, posterior: MeanFieldNormal) -> Tensor:
        log_alpha = self.log_alpha(posterior)
        neg_kl = (
            _K1 * torch.sigmoid(_K2 + _K3 * log_alpha)
            - 0.5 * torch.nn.functional.softplus(-log_alpha)  # log1p(1/alpha), stable
            - _K1
        )
        return -neg_kl.sum()

    def log_prob(self, value: Tensor) -> Tensor:
        """Unnormalised: ``-sum log |w|`` (the prior is improper)."""
        return -torch.log(value.abs() + 1e-16).sum()

    def init_sample(self, shape: torch.Size | tuple[int, ...]) -> None:
        """``None``: an improper prior has no samples; ``init="prior"`` keeps torch's init."""
        return None

    def config(self) -> dict[str, float]:
        return {"max_log_alpha": self.max_log_alpha}

    def extra_repr(self) -> str:
        return f"max_log_alpha={self.max_log_alpha:g}"

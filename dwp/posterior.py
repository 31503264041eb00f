"""The mean-field Gaussian posterior of one weight tensor, as priors see it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Independent, Normal

__all__ = ["MeanFieldNormal"]

_LOG_2PI_E = math.log(2.0 * math.pi * math.e)


@dataclass(frozen=True)
class MeanFieldNormal:
    """q(w) = prod_i N(w_i | loc_i, exp(log_scale_i)^2) over one parameter tensor (a *site*).

    This is what a prior's ``kl`` receives.  It is a view on the layer's parameters, so
    gradients of anything computed from it reach the layer.

    Attributes
    ----------
    loc
        Posterior mean, shape ``S`` (e.g. ``(C_out, C_in / groups, *kernel_size)``).
    log_scale
        Log standard deviation, shape ``S``.
    name
        Qualified name of the site (``"encoder.0.conv.weight"``), used in error messages and
        by priors that map layers to groups.
    kernel_dims
        Number of trailing dimensions of ``S`` that form one spatial kernel (3 for a
        ``Conv3d`` weight, 0 for a ``Linear`` weight or a bias).
    """

    loc: Tensor
    log_scale: Tensor
    name: str = "<unnamed>"
    kernel_dims: int = 0

    @property
    def scale(self) -> Tensor:
        """Standard deviation ``exp(log_scale)``, shape ``S``."""
        return self.log_scale.exp()

    @property
    def shape(self) -> torch.Size:
        return self.loc.shape

    @property
    def kernel_shape(self) -> torch.Size:
        """Shape of one spatial kernel slice (empty for dense weights and biases)."""
        return self.loc.shape[self.loc.dim() - self.kernel_dims :]

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Reparameterised sample, shape ``(*sample_shape, *S)``."""
        eps = torch.randn(
            (*sample_shape, *self.loc.shape), dtype=self.loc.dtype, device=self.loc.device
        )
        return self.loc + self.scale * eps

    def entropy(self) -> Tensor:
        """Differential entropy summed over the site: sum_i log sigma_i + 0.5 log(2 pi e)."""
        return self.log_scale.sum() + 0.5 * _LOG_2PI_E * self.loc.numel()

    def to_distribution(self) -> Independent:
        """The posterior as a ``torch.distributions`` object (event shape ``S``)."""
        return Independent(Normal(self.loc, self.scale), self.loc.dim())

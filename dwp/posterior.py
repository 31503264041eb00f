"""The mean-field Gaussian posterior of one weight tensor, as priors see it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.distributions import Independent, Normal

from .normal import normal_entropy

__all__ = ["MeanFieldNormal", "reparam_sample"]


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
    sample
        A reparameterised draw ``loc + scale * eps`` (shape ``S``) that is already in the
        autograd graph -- the weight the layer's last forward pass used -- or ``None``.
        A Monte Carlo KL estimator may use it instead of drawing its own (the deep weight
        prior does): the step then draws the weights once, not twice.
    """

    loc: Tensor
    log_scale: Tensor
    name: str = "<unnamed>"
    kernel_dims: int = 0
    sample: Tensor | None = None

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
        if not sample_shape:
            return reparam_sample(self.loc, self.log_scale)
        eps = torch.randn(
            (*sample_shape, *self.loc.shape), dtype=self.loc.dtype, device=self.loc.device
        )
        return self.loc + self.scale * eps

    def entropy(self) -> Tensor:
        """Differential entropy summed over the site: sum_i log sigma_i + 0.5 log(2 pi e)."""
        return normal_entropy(self.log_scale)

    def to_distribution(self) -> Independent:
        """The posterior as a ``torch.distributions`` object (event shape ``S``)."""
        return Independent(Normal(self.loc, self.scale), self.loc.dim())


class _ReparamSample(torch.autograd.Function):
    """``loc + exp(log_scale) * eps`` with ``eps ~ N(0, 1)`` drawn inside.

    The backward pass needs only ``sigma * eps`` (d/d loc = 1, d/d log_scale = sigma * eps),
    one tensor where autograd would keep ``sigma`` and ``eps``.  It is kept as an attribute
    rather than a saved tensor, which autograd frees after the first backward pass: the
    same sample can then be backpropagated through twice, e.g. by a data loss and, in a
    separate ``backward()``, by a KL estimate that shares the sample
    (:attr:`MeanFieldNormal.sample`).
    """

    @staticmethod
    def forward(ctx: Any, loc: Tensor, log_scale: Tensor) -> Tensor:
        noise = torch.randn_like(loc).mul_(log_scale.exp())
        ctx.noise = noise
        return loc + noise

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        d_log_scale = grad * ctx.noise if ctx.needs_input_grad[1] else None
        return (grad if ctx.needs_input_grad[0] else None), d_log_scale


def reparam_sample(loc: Tensor, log_scale: Tensor) -> Tensor:
    """One reparameterised draw of N(loc, exp(log_scale)^2), elementwise (shape of ``loc``).

    Differentiable in ``loc`` and ``log_scale`` (first order), and may be backpropagated
    through more than once.
    """
    return _ReparamSample.apply(loc, log_scale)

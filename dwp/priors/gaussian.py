"""Gaussian priors with a closed-form KL: N(loc, scale^2) and one centred on pretrained weights."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..normal import normal_log_density
from ..posterior import MeanFieldNormal
from .base import KLKind, Prior, PriorMismatchError

__all__ = ["NormalPrior", "PretrainedNormalPrior", "gaussian_kl"]


def gaussian_kl(q: MeanFieldNormal, loc: Tensor, scale: Tensor) -> Tensor:
    """sum_i KL(N(q.loc_i, q.scale_i^2) || N(loc_i, scale_i^2)); ``loc``/``scale`` broadcast.

    Written in terms of ``log_scale`` so that tiny posterior scales stay finite.
    """
    log_ratio = scale.log() - q.log_scale
    var_ratio = torch.exp(-2.0 * log_ratio)  # q.scale^2 / scale^2
    mahalanobis = ((q.loc - loc) / scale).pow(2)
    return (log_ratio + 0.5 * (var_ratio + mahalanobis) - 0.5).sum()


class NormalPrior(Prior):
    """p(w) = prod_i N(w_i | loc, scale^2): the standard Bayesian baseline (N(0, 1) by default).

    Parameters
    ----------
    loc, scale
        Mean and standard deviation shared by every weight of every site.
    """

    kl_kind = KLKind.EXACT

    def __init__(self, loc: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        if not scale > 0 or not math.isfinite(scale) or not math.isfinite(loc):
            raise ValueError(f"NormalPrior needs a finite loc and scale > 0, got {loc}, {scale}")
        self.register_buffer("loc", torch.tensor(float(loc)))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def kl(self, posterior: MeanFieldNormal) -> Tensor:
        return gaussian_kl(posterior, self.loc, self.scale)

    def log_prob(self, value: Tensor) -> Tensor:
        return normal_log_density(value, self.loc, self.scale).sum()

    def sample(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        return self.loc + self.scale * torch.randn(shape, device=self.loc.device)

    def extra_repr(self) -> str:
        return f"loc={self.loc.item():g}, scale={self.scale.item():g}"


class PretrainedNormalPrior(Prior):
    """A Gaussian centred on pretrained weights with scale proportional to their magnitude.

    p(w_i) = N(w0_i, (scale_factor * |w0_i| + min_scale)^2), as in MOPED
    (Krishnan et al. 2020).  Used as a template (``weight=None``) it takes the centre from
    each layer's weight when :func:`dwp.bayesianize` attaches it, so the layers must hold the
    pretrained weights at that time (``init="pretrained"``).

    Parameters
    ----------
    weight
        The centre ``w0``; ``None`` for a template.
    scale_factor
        ``delta`` in MOPED: the prior's standard deviation relative to ``|w0|``.
    min_scale
        Added to the scale so that zero weights do not get a zero-width prior.
    """

    kl_kind = KLKind.EXACT

    def __init__(
        self, weight: Tensor | None = None, scale_factor: float = 0.1, min_scale: float = 1e-3
    ) -> None:
        super().__init__()
        if not scale_factor >= 0 or not min_scale > 0:
            raise ValueError(
                f"PretrainedNormalPrior needs scale_factor >= 0 and min_scale > 0, "
                f"got {scale_factor}, {min_scale}"
            )
        self.scale_factor = float(scale_factor)
        self.min_scale = float(min_scale)
        centre = None if weight is None else weight.detach().clone()
        if centre is not None and not torch.isfinite(centre).all():
            raise ValueError("PretrainedNormalPrior: the pretrained weight has non-finite values")
        self.register_buffer("loc", centre)

    @property
    def scale(self) -> Tensor:
        self._require_centre()
        return self.scale_factor * self.loc.abs() + self.min_scale

    def _require_centre(self) -> None:
        if self.loc is None:
            raise RuntimeError(
                "this PretrainedNormalPrior is a template without pretrained weights; "
                "attach it with dwp.bayesianize(..., init='pretrained') or pass weight="
            )

    def for_site(self, name: str, weight: Tensor, kernel_dims: int) -> Prior:
        if self.loc is None:
            return PretrainedNormalPrior(weight, self.scale_factor, self.min_scale)
        if self.loc.shape != weight.shape:
            raise PriorMismatchError(
                f"PretrainedNormalPrior for {name!r}: centre has shape {tuple(self.loc.shape)}, "
                f"the parameter {tuple(weight.shape)}"
            )
        return self

    def _check(self, posterior: MeanFieldNormal) -> None:
        self._require_centre()
        if posterior.shape != self.loc.shape:
            raise PriorMismatchError(
                f"PretrainedNormalPrior for {posterior.name!r}: centre has shape "
                f"{tuple(self.loc.shape)}, the posterior {tuple(posterior.shape)}"
            )

    def kl(self, posterior: MeanFieldNormal) -> Tensor:
        self._check(posterior)
        return gaussian_kl(posterior, self.loc, self.scale)

    def log_prob(self, value: Tensor) -> Tensor:
        return normal_log_density(value, self.loc, self.scale).sum()

    def sample(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        self._require_centre()
        return self.loc + self.scale * torch.randn_like(self.loc)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A template (loc=None) accepts the centre stored in a checkpoint.
        key = prefix + "loc"
        if self.loc is None and key in state_dict:
            self.loc = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        shape = None if self.loc is None else tuple(self.loc.shape)
        return f"centre={shape}, scale_factor={self.scale_factor:g}, min_scale={self.min_scale:g}"

"""Gaussian priors with a closed-form KL: N(loc, scale^2) and one centred on pretrained weights.

Both can learn their strength by empirical Bayes (``learn_scale=True``): a scalar
``log_scale_factor`` per site multiplies the prior's standard deviations, the ELBO's
gradient trains it, and :meth:`~NormalPrior.closed_form_log_scale` gives its optimum for
the current posterior (:func:`dwp.empirical_bayes_` sets it).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

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


class _LearnedScale:
    """The empirical-Bayes factor ``c = exp(log_scale_factor)`` on a Gaussian prior's
    standard deviations (a mixin of the priors below; they provide ``loc`` and ``scale``).

    The prior is N(loc, c^2 scale^2).  For a fixed posterior N(m, s^2) the negative ELBO
    depends on ``c`` only through the KL, ``n log c + sum_i ((m_i - loc_i)^2 + s_i^2) /
    (2 c^2 scale_i^2) + const`` over the site's ``n`` weights, minimised at

        c^2 = mean_i ((m_i - loc_i)^2 + s_i^2) / scale_i^2.
    """

    loc: Tensor
    scale: Tensor
    log_scale_factor: nn.Parameter | None

    def _init_scale_factor(self, learn_scale: bool) -> None:
        self.learn_scale = bool(learn_scale)
        # registered only when learned: priors without it keep their state_dict keys, so
        # checkpoints written before empirical Bayes still load
        factor = nn.Parameter(torch.zeros(())) if self.learn_scale else None
        self.register_parameter("log_scale_factor", factor)

    @property
    def stddev(self) -> Tensor:
        """The standard deviations the KL uses: ``scale``, times the learned factor."""
        if self.log_scale_factor is None:
            return self.scale
        return self.scale * self.log_scale_factor.exp()

    def closed_form_log_scale(self, posterior: MeanFieldNormal) -> Tensor:
        """The ELBO-optimal ``log_scale_factor`` for ``posterior`` (a scalar; see the class
        notes), whether or not this prior learns its factor."""
        log_ratio = posterior.log_scale - self.scale.log()  # ratio in logs: tiny s stay finite
        ratio = ((posterior.loc - self.loc) / self.scale).pow(2) + torch.exp(2.0 * log_ratio)
        return 0.5 * ratio.mean().log()

    def _factor_repr(self) -> str:
        if self.log_scale_factor is None:
            return ""
        return f", learned factor={self.log_scale_factor.exp().item():g}"


class NormalPrior(_LearnedScale, Prior):
    """p(w) = prod_i N(w_i | loc, (c * scale)^2): the standard Bayesian baseline (N(0, 1) by
    default).

    A non-informative prior: it says nothing about where a network's weights should start,
    so ``init="prior"`` (:func:`dwp.bayesianize`) gives its layers torch's initialisation
    (:meth:`init_sample` declines) instead of N(0, 1) draws, which ignore the fan-in (weight
    std 0.94 against torch's 0.07 on a 64-feature head).

    Parameters
    ----------
    loc, scale
        Mean and standard deviation shared by every weight of every site.
    learn_scale
        Learn the factor ``c`` by empirical Bayes: each site (layer) gets its own scalar
        ``log_scale_factor`` parameter (0 at the start), trained by the ELBO's gradient or
        set to its closed form by :func:`dwp.empirical_bayes_`.
    """

    kl_kind = KLKind.EXACT

    def __init__(self, loc: float = 0.0, scale: float = 1.0, learn_scale: bool = False) -> None:
        super().__init__()
        if not scale > 0 or not math.isfinite(scale) or not math.isfinite(loc):
            raise ValueError(f"NormalPrior needs a finite loc and scale > 0, got {loc}, {scale}")
        self.register_buffer("loc", torch.tensor(float(loc)))
        self.register_buffer("scale", torch.tensor(float(scale)))
        self._init_scale_factor(learn_scale)

    def for_site(self, name: str, weight: Tensor, kernel_dims: int) -> Prior:
        # a learned factor is per site: every layer gets a copy with its own parameter
        return copy.deepcopy(self) if self.learn_scale else self

    def kl(self, posterior: MeanFieldNormal) -> Tensor:
        return gaussian_kl(posterior, self.loc, self.stddev)

    def batch_key(self) -> tuple | None:
        # Without a per-site factor every site bound to this instance has the same prior:
        # their KLs are one closed form over the concatenated weights.  A network's ~20
        # sites then cost a dozen kernel launches instead of a dozen each, which is what
        # this KL costs on a GPU (launches, not arithmetic).
        return None if self.learn_scale else ("normal", id(self))

    def kl_batch(self, posteriors: Sequence[MeanFieldNormal]) -> Tensor:
        """The KL summed over several sites of this prior, in one pass over their
        concatenated weights (equal to the sum of :meth:`kl` up to float rounding)."""
        if len(posteriors) == 1 or self.learn_scale:
            return super().kl_batch(posteriors)
        joined = MeanFieldNormal(
            torch.cat([p.loc.reshape(-1) for p in posteriors]),
            torch.cat([p.log_scale.reshape(-1) for p in posteriors]),
        )
        return gaussian_kl(joined, self.loc, self.stddev)

    def log_prob(self, value: Tensor) -> Tensor:
        return normal_log_density(value, self.loc, self.stddev).sum()

    def sample(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        return self.loc + self.stddev * torch.randn(shape, device=self.loc.device)

    def init_sample(self, shape: torch.Size | tuple[int, ...]) -> None:
        """``None``: no initial weights from this prior (see the class notes); the layer
        keeps torch's initialisation under ``init="prior"``."""
        return None

    def config(self) -> dict[str, float | bool]:
        return {"loc": float(self.loc), "scale": float(self.scale), "learn_scale": self.learn_scale}

    def extra_repr(self) -> str:
        return f"loc={self.loc.item():g}, scale={self.scale.item():g}{self._factor_repr()}"


class PretrainedNormalPrior(_LearnedScale, Prior):
    """A Gaussian centred on pretrained weights with scale proportional to their magnitude.

    p(w_i) = N(w0_i, c^2 (scale_factor * |w0_i| + min_scale)^2), as in MOPED
    (Krishnan et al. 2020), with ``c = 1`` unless learned.  Used as a template
    (``weight=None``) it takes the centre from each layer's weight when
    :func:`dwp.bayesianize` attaches it, so the layers must hold the pretrained weights at
    that time (``init="pretrained"``).  Fitted from source material, it is sampled by
    ``init="prior"``.

    Parameters
    ----------
    weight
        The centre ``w0``; ``None`` for a template.
    scale_factor
        ``delta`` in MOPED: the prior's standard deviation relative to ``|w0|``.
    min_scale
        Added to the scale so that zero weights do not get a zero-width prior.
    learn_scale
        Learn the factor ``c`` on the whole standard deviation by empirical Bayes, one
        scalar ``log_scale_factor`` per site (see :class:`NormalPrior`).
    """

    kl_kind = KLKind.EXACT

    def __init__(
        self,
        weight: Tensor | None = None,
        scale_factor: float = 0.1,
        min_scale: float = 1e-3,
        learn_scale: bool = False,
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
        self._init_scale_factor(learn_scale)

    @property
    def scale(self) -> Tensor:
        """MOPED's standard deviations ``scale_factor * |w0| + min_scale`` (without the
        learned factor: :attr:`stddev` has it)."""
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
            site = PretrainedNormalPrior(
                weight, self.scale_factor, self.min_scale, self.learn_scale
            )
            if self.log_scale_factor is not None:  # a template's factor (e.g. read from a file)
                with torch.no_grad():
                    site.log_scale_factor.copy_(self.log_scale_factor)
            return site
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
        return gaussian_kl(posterior, self.loc, self.stddev)

    def closed_form_log_scale(self, posterior: MeanFieldNormal) -> Tensor:
        self._check(posterior)
        return super().closed_form_log_scale(posterior)

    def log_prob(self, value: Tensor) -> Tensor:
        return normal_log_density(value, self.loc, self.stddev).sum()

    def sample(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        self._require_centre()
        return self.loc + self.stddev * torch.randn_like(self.loc)

    def config(self) -> dict[str, float | bool]:
        return {
            "scale_factor": self.scale_factor,
            "min_scale": self.min_scale,
            "learn_scale": self.learn_scale,
        }

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A template (loc=None) accepts the centre stored in a checkpoint.
        key = prefix + "loc"
        if self.loc is None and key in state_dict:
            self.loc = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        shape = None if self.loc is None else tuple(self.loc.shape)
        return (
            f"centre={shape}, scale_factor={self.scale_factor:g}, "
            f"min_scale={self.min_scale:g}{self._factor_repr()}"
        )

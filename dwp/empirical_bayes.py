"""Empirical Bayes for the prior's strength: learned scale factors, set and reported.

A prior built with ``learn_scale=True`` (:class:`~dwp.priors.NormalPrior`,
:class:`~dwp.priors.PretrainedNormalPrior`, and any prior following the same convention)
holds a scalar parameter ``log_scale_factor`` (0 at the start) that multiplies its
standard deviations, so the prior's covariance is ``exp(2 * log_scale_factor)`` times the
one it was built with.  Two ways to learn it, instead of a grid search over the KL weight:

* by gradient, with the posterior: the factor is an ordinary parameter of the model, so
  the ELBO's gradient reaches it and every optimiser of :mod:`dwp.optim` trains it (with
  Adam, like every parameter that is not a posterior scale);
* in closed form, where the prior has one (:meth:`closed_form_log_scale`; every Gaussian
  does): :func:`empirical_bayes_` sets each factor to the ELBO's maximiser for the current
  posterior.  The data term does not depend on the factor, so for a fixed posterior this
  is the exact optimum, and alternating it with training steps (e.g. once per epoch) is
  coordinate ascent on the ELBO.  It matters because Adam moves a parameter by about its
  learning rate per step: a factor of 1/10 (log -2.3) takes thousands of steps at 1e-3.

Per layer, or per group
-----------------------
The Gaussian priors here learn one factor **per site** (a layer's weight, or its
Bayesian bias): a template bound to several layers gives each its own copy of the
parameter.  An isotropic prior is wrong by a different factor in every layer (its scale
ignores the fan-in: an N(0, 1) prior is 14 times too wide for a 64-feature head whose
torch initialisation has std 0.07, and by another factor for every other fan-in), which
is what a per-layer factor corrects, as the layerwise prior precision of Laplace does.  A
prior object that serves several sites (a group template that returns itself from
``for_site``) has one factor for all of them; :func:`empirical_bayes_` then pools the
sites, which is exact for every Gaussian: each site adds ``n_k log c + T_k / (2 c^2)`` to
the KL, so ``c^2 = sum_k T_k / sum_k n_k = sum_k n_k c_k^2 / sum_k n_k`` with ``c_k`` the
site's own closed form and ``n_k`` its number of weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .posterior import MeanFieldNormal
from .priors import Prior
from .select import bayesian_layers

__all__ = ["empirical_bayes_", "prior_scales"]


def _learned_sites(model: nn.Module) -> list[tuple[str, Prior, MeanFieldNormal]]:
    """``(site name, prior, posterior)`` of every site whose prior has a learnable scale
    factor, the site named ``"<layer>.weight"`` / ``"<layer>.bias"`` within ``model``."""
    sites = []
    for name, layer in bayesian_layers(model):
        for prior, posterior in layer.sites():
            kind = posterior.name.rpartition(".")[2]  # "weight" or "bias"
            if isinstance(getattr(prior, "log_scale_factor", None), Tensor):
                sites.append((f"{name}.{kind}" if name else kind, prior, posterior))
    return sites


def prior_scales(model: nn.Module) -> dict[str, float]:
    """The learned scale factor ``c = exp(log_scale_factor)`` of every site that has one.

    Returns
    -------
    dict of str to float
        Keyed by site (``"encoder.0.weight"``, ``"encoder.0.bias"``), in module order;
        sites sharing one prior report the same factor.  Empty when no prior learns its
        scale.
    """
    return {
        name: float(prior.log_scale_factor.detach().exp())
        for name, prior, _ in _learned_sites(model)
    }


@torch.no_grad()
def empirical_bayes_(model: nn.Module) -> nn.Module:
    """Set every learnable prior scale of ``model`` to its closed-form optimum, in place.

    For each prior with a trainable ``log_scale_factor`` and a ``closed_form_log_scale``
    method, the factor becomes the ELBO's maximiser for the current posterior; a prior
    shared by several sites gets the pooled optimum (see the module notes).  Priors whose
    factor has no closed form (only a gradient) and frozen factors are left as they are.

    Returns
    -------
    nn.Module
        ``model``.
    """
    groups: dict[int, tuple[Prior, list[MeanFieldNormal]]] = {}
    for _, prior, posterior in _learned_sites(model):
        groups.setdefault(id(prior), (prior, []))[1].append(posterior)
    for prior, posteriors in groups.values():
        closed_form = getattr(prior, "closed_form_log_scale", None)
        if closed_form is None or not prior.log_scale_factor.requires_grad:
            continue
        logs = torch.stack([closed_form(p).double() for p in posteriors])
        counts = torch.tensor([float(p.loc.numel()) for p in posteriors], device=logs.device)
        # log sqrt(sum_k n_k c_k^2 / sum_k n_k), in logs: c_k^2 can span many decades
        pooled = 0.5 * (torch.logsumexp(2.0 * logs + counts.log(), 0) - counts.sum().log())
        prior.log_scale_factor.copy_(pooled)
    return model

"""A fair fit report for priors over whole networks: the weights of held-out networks, in
nats per weight.

The source-trajectory (SWAG) prior is a Gaussian over each layer's weights, not a
distribution of kernels, so :mod:`dwp.priors.report`'s kernel scores do not apply.  It is
judged the same way all the same: by the log density it gives the weights of networks it
has not seen (snapshots of the trajectory kept out of the moments, or the networks of
another source run), with every prior scored on the same networks.  Its controls are the
same Gaussian without correlations (:meth:`dwp.SWAGPrior.marginal`: the same variances) and
an isotropic one at the same mean (``marginal(pooled=True)``); the low-rank covariance
carries structure only if it beats them, as the kernel VAE must beat the kernel Gaussian.
The densities are exact (closed forms), so the scores are too; differences against a
reference are paired (the same networks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .base import Prior

__all__ = ["render_weight_scores", "weight_scores"]


@torch.no_grad()
def _network_score(prior: Prior, network: Mapping[str, Tensor], sites: Sequence[str]) -> float:
    """log p(network's weights at ``sites``) / their count."""
    total, count = 0.0, 0
    for site in sites:
        if site not in network:
            raise KeyError(
                f"the held-out network has no {site!r} (it holds {len(network)} tensors)"
            )
        weight = network[site].detach().double()
        site_prior = prior.for_site(site, weight, max(weight.dim() - 2, 0)).double()
        total += float(site_prior.log_prob(weight).sum())
        count += weight.numel()
    return total / count


def _summary(values: Tensor) -> dict[str, float]:
    se = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return {"mean": values.mean().item(), "se": se}


def weight_scores(
    priors: Mapping[str, Prior],
    networks: Sequence[Mapping[str, Tensor]],
    sites: Sequence[str],
    *,
    reference: str | None = None,
) -> dict[str, Any]:
    """Every prior scored on the same held-out networks: mean log density per weight.

    Parameters
    ----------
    priors
        Display name -> prior template (any :class:`~dwp.priors.Prior` whose
        ``for_site(...).log_prob`` gives a density; e.g. a :class:`dwp.SWAGPrior` and its
        :meth:`~dwp.SWAGPrior.marginal` controls).
    networks
        State dicts of networks used for no choice in fitting any prior.
    sites
        Parameter names scored (``"down1.conv1.conv.weight"``, ...).
    reference
        The prior the others are compared with (paired differences over the networks).

    Returns
    -------
    dict
        ``unit`` ("nats per weight"), ``weights`` (per network), ``networks``, ``scores``
        (name -> ``mean`` / ``se`` over the networks), ``per_network`` (name -> list) and,
        with a reference, ``differences`` (name -> paired ``mean`` / ``se``).
    """
    if not networks:
        raise ValueError("weight_scores needs at least one held-out network")
    if not sites:
        raise ValueError("weight_scores needs at least one site")
    if reference is not None and reference not in priors:
        raise ValueError(f"reference {reference!r} is not one of the priors {list(priors)}")
    values = {
        name: torch.tensor(
            [_network_score(prior, net, sites) for net in networks], dtype=torch.float64
        )
        for name, prior in priors.items()
    }
    result: dict[str, Any] = {
        "unit": "nats per weight",
        "weights": sum(networks[0][s].numel() for s in sites),
        "networks": len(networks),
        "reference": reference,
        "scores": {name: _summary(v) for name, v in values.items()},
        "per_network": {name: v.tolist() for name, v in values.items()},
    }
    if reference is not None:
        result["differences"] = {
            name: _summary(v - values[reference]) for name, v in values.items() if name != reference
        }
    return result


def render_weight_scores(scores: Mapping[str, Any]) -> str:
    """Markdown table of :func:`weight_scores`: a row per prior, mean ± standard error over
    the held-out networks in nats per weight, and the paired difference to the reference."""
    reference = scores["reference"]
    lines = [
        f"| prior | nats/weight ({scores['networks']} held-out networks, "
        f"{scores['weights']:,} weights each) | − {reference or 'reference'} (paired) |",
        "|---|---|---|",
    ]
    for name, summary in scores["scores"].items():
        diff = scores.get("differences", {}).get(name)
        cell = f"{diff['mean']:.4f} ± {diff['se']:.4f}" if diff else "—"
        lines.append(f"| {name} | {summary['mean']:.4f} ± {summary['se']:.4f} | {cell} |")
    return "\n".join(lines)

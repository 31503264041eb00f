"""Optimisers for variational training, behind one factory (:func:`build_optimizer`).

===========  ==================================================================================
``natural``  :class:`NaturalVI` (the default for Bayesian networks): Adam on the means, a
             natural-gradient step on the posterior scales, which reach their optimum
             within tens of steps whatever the prior.
``adam``     ``torch.optim.Adam`` on everything, the scales at ``scale_lr``
             (:func:`dwp.param_groups`): the scales move about ``scale_lr`` per step.
``sgd``      ``torch.optim.SGD``, likewise.
``ivon``     :class:`IVON` (Shen et al. 2024) for plain networks: the optimiser keeps the
             posterior; :func:`to_bayesian` exports it to dwp layers.
===========  ==================================================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from enum import Enum
from typing import Any

import torch
from torch import nn

from ..elbo import param_groups
from ..select import bayesian_layers
from .ivon import IVON, to_bayesian
from .natural import NaturalVI, posterior_groups

__all__ = [
    "IVON",
    "NaturalVI",
    "OptimizerName",
    "build_optimizer",
    "posterior_groups",
    "sampling_step",
    "to_bayesian",
]


class OptimizerName(str, Enum):
    """The optimiser paths :func:`build_optimizer` knows."""

    NATURAL = "natural"
    """Adam on the means, natural-gradient steps on the posterior scales (Bayesian nets)."""
    ADAM = "adam"
    """Adam on every parameter; posterior scales at their own learning rate."""
    SGD = "sgd"
    """SGD (with optional momentum) on every parameter, likewise."""
    IVON = "ivon"
    """IVON on a plain network: the optimiser holds the posterior (deterministic nets)."""


def build_optimizer(
    name: OptimizerName | str,
    model: nn.Module,
    lr: float,
    *,
    kl_weight: float | Callable[[int], float] | None = None,
    scale_rate: float = 0.1,
    scale_lr: float | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    ess: float | None = None,
    **ivon_options: Any,
) -> torch.optim.Optimizer:
    """The optimiser ``name`` for ``model``.

    Parameters
    ----------
    name
        See :class:`OptimizerName`.
    model
        The network (frozen parameters are left out).
    lr
        Learning rate of the means (and every non-posterior parameter).
    kl_weight
        ``natural``: the KL weight ``beta`` of the loss (a number or a function of the
        step, e.g. a :class:`dwp.KLSchedule`).
    scale_rate
        ``natural``: the natural step's rate on the scales.
    scale_lr
        ``adam`` / ``sgd``: learning rate of the posterior log-scales (default ``lr``).
    momentum, weight_decay
        ``sgd`` momentum; weight decay of the means (``ivon``: its prior precision).
    ess, ivon_options
        ``ivon``: effective sample size and :class:`IVON`'s other options.

    Raises
    ------
    ValueError
        An unknown name, or an optimiser that does not fit the model, naming the option:
        ``natural`` on a network without Bayesian layers or without ``kl_weight``,
        ``ivon`` on one with Bayesian layers (it keeps its own posterior) or without
        ``ess``.
    """
    try:
        name = OptimizerName(name)
    except ValueError:
        choices = [n.value for n in OptimizerName]
        raise ValueError(f"unknown optimizer {name!r}; choose from {choices}") from None
    trainable = [p for p in model.parameters() if p.requires_grad]
    if name is OptimizerName.NATURAL:
        return NaturalVI(
            model, lr, kl_weight=kl_weight, scale_rate=scale_rate, weight_decay=weight_decay
        )
    if name is OptimizerName.IVON:
        layers = [n for n, _ in bayesian_layers(model)]
        if layers:
            raise ValueError(
                f"optimizer 'ivon' keeps its own posterior over plain weights, but "
                f"{type(model).__name__} has Bayesian layers ({layers[:3]}); use 'natural'"
            )
        if ess is None:
            raise ValueError("optimizer 'ivon' needs ess=, the effective sample size")
        return IVON(trainable, lr, ess, weight_decay=weight_decay, **ivon_options)
    if ivon_options:
        raise TypeError(f"options {sorted(ivon_options)} are for optimizer 'ivon' only")
    groups = param_groups(model, lr, scale_lr)
    if name is OptimizerName.SGD:
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)


def sampling_step(optimizer: torch.optim.Optimizer) -> contextlib.AbstractContextManager[Any]:
    """What a training step's forward and backward pass run inside: IVON's weight sample
    (``sampled_params(train=True)``), nothing for the other optimisers."""
    if isinstance(optimizer, IVON):
        return optimizer.sampled_params(train=True)
    return contextlib.nullcontext()

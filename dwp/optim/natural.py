"""Adam on the posterior means, a natural-gradient step on the posterior scales.

Why not Adam on the scales
--------------------------
The negative ELBO ``L = data + beta * KL`` has, on every log standard deviation, the
gradient

    dL / d log sigma_i = sigma_i^2 E_q[d^2 (data + beta * (-log p)) / dw_i^2] - beta,

the second term being the entropy's.  Adam divides a gradient by its running magnitude, so
a constant ``-beta`` becomes a step of about ``lr`` whatever ``beta`` is: the scales either
run away (same learning rate as the means) or hardly move (a tenth of it; measured here:
log sigma -5 -> -4.985 in 150 steps).  Neither reaches the optimum, where the gradient
vanishes: ``sigma_i^2 = beta / h_i`` with ``h_i`` the curvature above.

The natural-gradient step
-------------------------
For a Gaussian posterior the natural gradient of ``L / beta`` updates the *precision*
``S_i = beta / sigma_i^2`` towards the curvature estimate
``h_i = (dL/dlog sigma_i + beta) / sigma_i^2``, which the reparameterised gradient already
holds (Bonnet / Price: ``dE_q[f]/dsigma^2 = E_q[f''] / 2``).  With the positivity-keeping
second-order form of the Bayesian learning rule (Lin, Schmidt & Khan, ICML 2020),

    S_i <- S_i + rho (h_i - S_i) + rho^2 (h_i - S_i)^2 / (2 S_i),

i.e. with ``x_i = rho * (dL/dlog sigma_i) / beta``,

    log sigma_i <- log sigma_i - log(1 + x_i + x_i^2 / 2) / 2,

which needs no state, is defined for any gradient (``1 + x + x^2/2 >= 1/2``), moves a scale
by at most ``2^(1/4)`` per step upwards and stops exactly where the ELBO's gradient
vanishes.  ``rho`` (the scale group's ``lr``) is the fraction of the way to the current
curvature estimate taken per step: it averages the Monte Carlo noise of ``h`` over about
``1 / rho`` steps.  The curvature includes the prior's, whatever the prior: the gradient
comes from its ``kl`` (exact, an upper bound like the deep weight prior's, or an
approximation), so the step needs nothing but the KL weight ``beta`` of the loss.
This is the precision half of variational online Newton (VON, IVON); the means keep
Adam, whose learning rate users already know how to set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.adam import adam

from ..select import bayesian_layers

__all__ = ["NaturalVI", "posterior_groups"]

KLWeight = float | Callable[[int], float]


def posterior_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(log-scales, everything else)``: the trainable posterior log standard deviations
    of ``model``'s Bayesian layers, and its other trainable parameters (means, biases,
    norms, a deep weight prior's encoder)."""
    scale_ids = {
        id(p)
        for _, layer in bayesian_layers(model)
        for p in (layer.weight_log_sigma, layer.bias_log_sigma)
        if p is not None
    }
    scales, others = [], []
    for p in model.parameters():
        if p.requires_grad:
            (scales if id(p) in scale_ids else others).append(p)
    return scales, others


def _check_kl_weight(beta: float) -> float:
    beta = float(beta)
    if not (beta >= 0 and math.isfinite(beta)):
        raise ValueError(
            f"optimizer 'natural' needs the loss's KL weight, a finite number >= 0 (the "
            f"scales' optimum is sigma^2 = beta / curvature), got {beta}"
        )
    return beta


class NaturalVI(torch.optim.Optimizer):
    """Variational training of a dwp model: Adam on the means (and every other parameter),
    a natural-gradient step on the posterior log-scales (see the module notes).

    Parameters
    ----------
    model
        A network with :mod:`dwp` Bayesian layers (the ``_log_sigma`` parameters are found
        by :func:`dwp.bayesian_layers`).
    lr
        Adam's learning rate of the means and other parameters.
    kl_weight
        The weight ``beta`` of the KL in the loss being minimised (``dwp.elbo(...,
        beta=)``): a number, or a function of the optimiser's step count (e.g. the same
        :class:`dwp.KLSchedule` the loss uses; the count is in :meth:`state_dict`, so a
        resumed run continues the schedule).  ``step(kl_weight=...)`` overrides it for one
        step.  At a weight of 0 (the start of a warm-up from 0) the loss has no KL and the
        scales no optimum: they are left as they are for that step.
    scale_rate
        ``rho``: the fraction of the way to the current curvature estimate each step takes
        (the scale group's ``lr``, so learning-rate schedulers anneal it with the means').
    betas, eps, weight_decay
        Adam's (``weight_decay`` on the means only; the prior regularises the scales).

    Raises
    ------
    ValueError
        A model without Bayesian layers (the option is then ``"adam"``, ``"sgd"`` or
        ``"ivon"``), a rate outside ``(0, 1]`` or a negative learning rate.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        *,
        kl_weight: KLWeight | None,
        scale_rate: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        scales, others = posterior_groups(model)
        if not scales:
            raise ValueError(
                f"optimizer 'natural' updates posterior scales, but {type(model).__name__} has "
                f"no trainable Bayesian layer; use 'adam', 'sgd' or 'ivon' for a "
                f"deterministic network"
            )
        if not 0 < scale_rate <= 1:
            raise ValueError(f"scale_rate must be in (0, 1], got {scale_rate}")
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if kl_weight is None:
            raise ValueError("optimizer 'natural' needs kl_weight=, the KL weight of the loss")
        if not callable(kl_weight):
            _check_kl_weight(kl_weight)
        self.kl_weight = kl_weight
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, natural=False)
        # a prior's learned scale factor (empirical Bayes) trains with Adam, without weight
        # decay, which would pull it towards 1
        factor_ids = {id(p) for n, p in model.named_parameters() if n.endswith("log_scale_factor")}
        means = [p for p in others if id(p) not in factor_ids]
        factors = [p for p in others if id(p) in factor_ids]
        groups: list[dict[str, Any]] = [{"params": means}] if means else []
        if factors:
            groups.append({"params": factors, "weight_decay": 0.0})
        groups.append({"params": scales, "lr": scale_rate, "natural": True, "steps": 0})
        super().__init__(groups, defaults)

    def _beta(self, group: dict[str, Any], override: float | None) -> float:
        if override is not None:
            beta = override
        elif callable(self.kl_weight):
            beta = self.kl_weight(group["steps"])
        else:
            beta = self.kl_weight
        return _check_kl_weight(beta)

    @torch.no_grad()
    def step(
        self, closure: Callable[[], Tensor] | None = None, *, kl_weight: float | None = None
    ) -> Tensor | None:
        """One step: Adam on the means, the natural step on the scales (their gradients
        must come from a loss whose KL weight is ``kl_weight``, or the constructor's)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["natural"]:
                beta = self._beta(group, kl_weight)
                if beta > 0:
                    self._natural_step(group, beta)
                group["steps"] += 1
            else:
                self._adam_step(group)
        return loss

    def _natural_step(self, group: dict[str, Any], beta: float) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        # The same elementwise update for every scale tensor, as a handful of multi-tensor
        # kernels: on a GPU a per-tensor loop costs launches, not arithmetic.
        x = torch._foreach_mul([p.grad for p in params], group["lr"] / beta)
        # log(1 + x + x^2/2) = log1p(x (1 + x/2)): exact near 0, positive argument always
        half = torch._foreach_mul(x, 0.5)
        torch._foreach_add_(half, 1.0)
        torch._foreach_mul_(half, x)
        torch._foreach_log1p_(half)
        torch._foreach_add_(params, half, alpha=-0.5)

    def _adam_step(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:  # the layout of torch.optim.Adam's state, so it reads the same
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adam(  # torch's own Adam update: the means train exactly as under torch.optim.Adam
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    def scale_parameters(self) -> Iterable[Tensor]:
        """The posterior log-scales this optimiser updates."""
        for group in self.param_groups:
            if group["natural"]:
                yield from group["params"]

"""IVON: improved variational online Newton (Shen et al., ICML 2024), for plain networks.

IVON keeps a mean-field Gaussian posterior over the weights of an ordinary network (no
Bayesian layers): the parameters hold the mean ``m``, the optimiser state a diagonal
curvature estimate ``h`` and the posterior standard deviation is
``sigma = 1 / sqrt(ess * (h + weight_decay))``.  Each step draws one weight sample, takes
the gradient ``g`` of the minibatch loss there and updates, as in the paper's Algorithm 1,

    h_hat = g * (theta - m) / sigma^2                      (reparameterisation trick)
    g_bar <- beta1 g_bar + (1 - beta1) g
    h     <- beta2 h + (1 - beta2) h_hat + (1 - beta2)^2 (h - h_hat)^2 / (2 (h + delta))
    m     <- m - lr * clip((g_bar / (1 - beta1^t) + delta m) / (h + delta), +-clip_radius)

with ``delta`` the weight decay: the prior is N(0, 1 / (ess * delta)) on every weight.
Written here from the paper (the authors' ``ivon-opt`` package is GPL-3.0-or-later, which
an Apache-2.0 library cannot depend on).  :func:`to_bayesian` turns the trained network
and its posterior into a dwp Bayesian network, so prediction, uncertainty maps and
checkpoints work as for the library's own variational training.

Usage::

    optimizer = dwp.optim.IVON(net.parameters(), lr=0.1, ess=len(train_set))
    for x, y in loader:
        optimizer.zero_grad()
        with optimizer.sampled_params(train=True):
            loss = criterion(net(x), y)  # the minibatch's *mean* loss
            loss.backward()
        optimizer.step()
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..convert import bayesianize
from ..priors import NormalPrior
from ..select import bayesian_layers

__all__ = ["IVON", "to_bayesian"]


class IVON(torch.optim.Optimizer):
    """The IVON optimiser (see the module notes); hyper-parameter names follow the paper.

    Parameters
    ----------
    params
        The network's parameters (plain tensors: a network with dwp Bayesian layers has
        its own posterior; use ``"natural"`` for it).
    lr
        Learning rate ``alpha`` of the means (the paper uses about 0.1-0.2: the step is
        preconditioned by the posterior precision, not by Adam's running magnitudes).
    ess
        Effective sample size ``lambda``: the loss is a mean over examples, and
        ``ess * loss`` the negative log-likelihood of the data set (usually its size).
    hess_init
        ``h0``, the initial curvature: it sets the initial posterior scale.
    beta1, beta2
        Momentum of the gradient and of the curvature estimate.
    weight_decay
        ``delta``: the prior precision per example (prior N(0, 1 / (ess * delta))).
    clip_radius
        Elementwise clip of the preconditioned step.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        ess: float,
        *,
        hess_init: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        weight_decay: float = 1e-4,
        clip_radius: float = math.inf,
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not ess > 0:
            raise ValueError(f"ess must be > 0, got {ess}")
        if not hess_init > 0 or not weight_decay >= 0:
            raise ValueError("hess_init must be > 0 and weight_decay >= 0")
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {beta1}, {beta2}")
        defaults = dict(
            lr=lr,
            ess=ess,
            hess_init=hess_init,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            clip_radius=clip_radius,
        )
        super().__init__(params, defaults)
        self._sampled: dict[Tensor, tuple[Tensor, Tensor]] = {}  # param -> (mean, noise)

    def _state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["hess"] = torch.full_like(p, group["hess_init"])
            state["momentum"] = torch.zeros_like(p)
        return state

    def posterior_scale(self, p: Tensor) -> Tensor:
        """``sigma = 1 / sqrt(ess * (h + weight_decay))`` of parameter ``p``."""
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        hess = self._state(p, group)["hess"]
        return (group["ess"] * (hess + group["weight_decay"])).rsqrt()

    @contextlib.contextmanager
    def sampled_params(self, train: bool = False) -> Iterator[None]:
        """Inside the block the parameters hold one posterior sample ``m + sigma * eps``;
        the means come back on exit (also on error).  ``train=True`` keeps the noise for
        the next :meth:`step` (backpropagate inside the block); one sample per step."""
        if train and self._sampled:
            raise RuntimeError("IVON takes one sample per step: call step() before sampling again")
        drawn: dict[Tensor, tuple[Tensor, Tensor]] = {}
        try:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        noise = torch.randn_like(p).mul_(self.posterior_scale(p))
                        drawn[p] = (p.detach().clone(), noise)
                        p.add_(noise)
            yield
        finally:
            with torch.no_grad():
                for p, (mean, _) in drawn.items():
                    p.copy_(mean)
        if train:
            self._sampled = drawn

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update means and curvature from the gradient at the sample drawn by
        :meth:`sampled_params` (``train=True``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._sampled:
            raise RuntimeError(
                "IVON.step() needs the gradient at a posterior sample: backpropagate inside "
                "`with optimizer.sampled_params(train=True):`"
            )
        for group in self.param_groups:
            delta, b1, b2 = group["weight_decay"], group["beta1"], group["beta2"]
            for p in group["params"]:
                if p.grad is None or p not in self._sampled:
                    continue
                state = self._state(p, group)
                _, noise = self._sampled[p]
                sigma2 = self.posterior_scale(p).square()
                hess_hat = p.grad * noise / sigma2
                state["step"] += 1
                state["momentum"].mul_(b1).add_(p.grad, alpha=1 - b1)
                hess = state["hess"]
                correction = (
                    (hess - hess_hat).square_().div_(hess + delta).mul_(0.5 * (1 - b2) ** 2)
                )
                hess.mul_(b2).add_(hess_hat, alpha=1 - b2).add_(correction)
                g_bar = state["momentum"] / (1 - b1 ** state["step"])
                update = (g_bar + delta * p).div_(hess + delta)
                update.clamp_(-group["clip_radius"], group["clip_radius"])
                p.sub_(update, alpha=group["lr"])
        self._sampled = {}
        return loss


def to_bayesian(
    model: nn.Module, optimizer: IVON, *, estimator: str = "reparam", inplace: bool = False
) -> nn.Module:
    """``model`` with its conv / linear layers Bayesian, holding IVON's posterior: means
    from the parameters, ``log sigma`` from the optimiser's curvature, the prior IVON
    assumed (N(0, 1 / (ess * weight_decay)), or N(0, 1) without weight decay).

    Only layers whose weights the optimiser trained become Bayesian; their biases stay
    deterministic at the posterior mean.  The result predicts with :func:`dwp.predict`,
    ``unet3d``'s sliding windows and saves like any dwp network.
    """
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = {
        name
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), Tensor) and id(module.weight) in trained
    }
    group = optimizer.param_groups[0]
    precision = group["ess"] * group["weight_decay"]
    prior = NormalPrior(0.0, 1.0 if precision <= 0 else precision**-0.5)
    source = model if inplace else copy.deepcopy(model)
    scales = {
        name: optimizer.posterior_scale(module.weight)
        for name, module in model.named_modules()
        if name in names
    }
    bayes = bayesianize(
        source,
        prior,
        include=lambda name, layer: name in names,
        estimator=estimator,
        inplace=True,
    )
    with torch.no_grad():
        for name, layer in bayesian_layers(bayes):
            layer.weight_log_sigma.copy_(scales[name].log())
    return bayes

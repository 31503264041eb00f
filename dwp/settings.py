"""Estimators, sampling modes and validation switches for Bayesian layers.

Every Bayesian layer (:mod:`dwp.nn`) has two settings:

* an **estimator**, how a forward pass turns the posterior into an output
  (:class:`Estimator`), and
* a **mode**, whether it samples from the posterior or uses its mean (:class:`Mode`).

Each layer stores its own settings (constructor argument, :func:`set_estimator`,
:func:`set_mode`).  The context managers :func:`estimator` and :func:`sampling` change
them temporarily, either for one model (``model=...``) or, without a model, for every
Bayesian layer in the current thread.  A thread-wide override wins over layer settings.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from enum import Enum

import torch
from torch import nn

__all__ = [
    "Estimator",
    "Mode",
    "estimator",
    "fixed_sample",
    "sampling",
    "set_estimator",
    "set_mode",
    "set_validation",
    "validation_enabled",
]


class Estimator(str, Enum):
    """How a Bayesian layer draws its output from the weight posterior."""

    REPARAM = "reparam"
    """One reparameterised weight sample ``w = mu + sigma * eps`` per forward pass, shared by
    the whole batch.  Costs one convolution; gradients are the noisiest of the three."""

    LOCAL_REPARAM = "local_reparam"
    """Local reparameterisation (Kingma et al. 2015): sample the pre-activations from their
    Gaussian marginal ``N(x * mu, x^2 * sigma^2)``.  Two convolutions; independent noise per
    output element (exact for linear layers, a marginal-matching approximation for convs,
    whose outputs at neighbouring positions share weights)."""

    FLIPOUT = "flipout"
    """Flipout (Wen et al. 2018): one weight perturbation decorrelated across examples by
    random sign flips of inputs and outputs.  Two convolutions; per-example marginals are
    exact."""


class Mode(str, Enum):
    """Whether a Bayesian layer samples its weights or uses the posterior mean."""

    AUTO = "auto"
    """Sample while the module is training, use the posterior mean in ``eval()``."""
    SAMPLE = "sample"
    """Always sample (Monte Carlo prediction in eval)."""
    MEAN = "mean"
    """Always use the posterior mean: the layer behaves as its torch twin."""


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.estimator: Estimator | None = None
        self.mode: Mode | None = None
        self.validate: bool = True


_state = _ThreadState()


def global_estimator() -> Estimator | None:
    """The thread-wide estimator override, or ``None``."""
    return _state.estimator


def global_mode() -> Mode | None:
    """The thread-wide mode override, or ``None``."""
    return _state.mode


def validation_enabled() -> bool:
    """Whether layers check their posterior for non-finite values on every forward pass."""
    return _state.validate


def set_validation(enabled: bool) -> None:
    """Turn the per-forward finiteness check of posterior parameters on or off.

    The check costs one reduction over the weights per layer and, on a GPU, a device
    synchronisation; switch it off for production runs once training is known to be stable.
    """
    _state.validate = bool(enabled)


def _bayes_layers(model: nn.Module) -> list[nn.Module]:
    from .nn import BayesianLayer  # local import: nn imports this module

    layers = [m for m in model.modules() if isinstance(m, BayesianLayer)]
    return layers


def set_estimator(model: nn.Module, estimator: Estimator | str) -> nn.Module:
    """Set the estimator of every Bayesian layer in ``model`` (in place); returns ``model``."""
    est = Estimator(estimator)
    for layer in _bayes_layers(model):
        layer.estimator = est
    return model


def set_mode(model: nn.Module, mode: Mode | str) -> nn.Module:
    """Set the sampling mode of every Bayesian layer in ``model`` (in place); returns ``model``."""
    md = Mode(mode)
    for layer in _bayes_layers(model):
        layer.mode = md
    return model


@contextlib.contextmanager
def _override_layers(model: nn.Module, attribute: str, value: Enum) -> Iterator[None]:
    layers = _bayes_layers(model)
    saved = [getattr(layer, attribute) for layer in layers]
    try:
        for layer in layers:
            setattr(layer, attribute, value)
        yield
    finally:
        for layer, old in zip(layers, saved, strict=True):
            setattr(layer, attribute, old)


@contextlib.contextmanager
def _override_thread(attribute: str, value: Enum) -> Iterator[None]:
    saved = getattr(_state, attribute)
    setattr(_state, attribute, value)
    try:
        yield
    finally:
        setattr(_state, attribute, saved)


def estimator(name: Estimator | str, model: nn.Module | None = None):
    """Context manager: use estimator ``name`` inside the block.

    Parameters
    ----------
    name
        ``"reparam"``, ``"local_reparam"`` or ``"flipout"`` (see :class:`Estimator`).
    model
        Restrict the change to the Bayesian layers of this model.  Without a model the
        override applies to every Bayesian layer used in the current thread.

    Examples
    --------
    >>> with dwp.estimator("flipout", model):
    ...     loss = criterion(model(x), y)
    """
    est = Estimator(name)
    if model is None:
        return _override_thread("estimator", est)
    return _override_layers(model, "estimator", est)


def sampling(enabled: bool = True, model: nn.Module | None = None):
    """Context manager: sample from the posterior (``True``) or use its mean (``False``).

    ``with dwp.sampling():`` in ``eval()`` gives Monte Carlo predictions;
    ``with dwp.sampling(False):`` in training gives the deterministic mean network.
    ``model`` restricts the change to one model, as in :func:`estimator`.
    """
    mode = Mode.SAMPLE if enabled else Mode.MEAN
    if model is None:
        return _override_thread("mode", mode)
    return _override_layers(model, "mode", mode)


@contextlib.contextmanager
def fixed_sample(model: nn.Module, generator: torch.Generator | None = None) -> Iterator[None]:
    """Context manager: draw ONE posterior sample of every Bayesian parameter of ``model``
    and use it for every forward pass inside the block.

    :func:`sampling` draws afresh on every forward pass (and ``local_reparam`` / ``flipout``
    never form a weight sample at all), so a prediction assembled from several passes --
    e.g. the windows of a sliding-window inference -- would mix networks.  Inside this
    block each Bayesian layer holds ``mu + sigma * eps`` as its weight and runs in mean
    mode, whatever its estimator; the posterior means are restored on exit, also on error.
    Do not use the model from another thread meanwhile.

    Parameters
    ----------
    model
        A network with Bayesian layers.
    generator
        Source of ``eps`` (default: the global generator).
    """
    from .nn import BayesianLayer  # local import: nn imports this module

    layers = [m for m in model.modules() if isinstance(m, BayesianLayer)]
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer in layers:
                for _, posterior in layer.sites():
                    mean = posterior.loc  # the layer's parameter itself
                    eps = torch.randn(
                        mean.shape, generator=generator, device=mean.device, dtype=mean.dtype
                    )
                    saved.append((mean, mean.detach().clone()))
                    mean.add_(posterior.log_scale.exp() * eps)
        with sampling(False, model):
            yield
    finally:
        with torch.no_grad():
            for param, value in saved:
                param.copy_(value)

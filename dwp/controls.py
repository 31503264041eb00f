"""Controls that walk a model's Bayesian layers: estimators, sampling modes, fixed samples.

Each layer stores its own settings (see :mod:`dwp.settings` for what they mean);
:func:`set_estimator` and :func:`set_mode` change them for good, the context managers
:func:`estimator` and :func:`sampling` for the duration of a block, for one model
(``model=...``) or, without a model, for every Bayesian layer in the current thread, and
:func:`fixed_sample` holds one posterior sample of a whole model for a block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from enum import Enum

import torch
from torch import nn

from .select import bayesian_layers
from .settings import Estimator, Mode, override_thread

__all__ = ["estimator", "fixed_sample", "sampling", "set_estimator", "set_mode"]


def _bayes_layers(model: nn.Module) -> list[nn.Module]:
    return [layer for _, layer in bayesian_layers(model)]


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
        return override_thread("estimator", est)
    return _override_layers(model, "estimator", est)


def sampling(enabled: bool = True, model: nn.Module | None = None):
    """Context manager: sample from the posterior (``True``) or use its mean (``False``).

    ``with dwp.sampling():`` in ``eval()`` gives Monte Carlo predictions;
    ``with dwp.sampling(False):`` in training gives the deterministic mean network.
    ``model`` restricts the change to one model, as in :func:`estimator`.
    """
    mode = Mode.SAMPLE if enabled else Mode.MEAN
    if model is None:
        return override_thread("mode", mode)
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
    layers = _bayes_layers(model)
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

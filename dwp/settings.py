"""Estimators, sampling modes and validation switches for Bayesian layers: the leaf state.

Every Bayesian layer (:mod:`dwp.nn`) has two settings:

* an **estimator**, how a forward pass turns the posterior into an output
  (:class:`Estimator`), and
* a **mode**, whether it samples from the posterior or uses its mean (:class:`Mode`).

Each layer stores its own settings (constructor argument, :func:`dwp.set_estimator`,
:func:`dwp.set_mode`).  The context managers :func:`dwp.estimator` and :func:`dwp.sampling`
change them temporarily, either for one model (``model=...``) or, without a model, for
every Bayesian layer in the current thread.  A thread-wide override wins over layer
settings.

This module holds only the enums and the thread-wide state, and imports nothing of dwp,
so that the layers can read it; the functions that walk a model's layers are in
:mod:`dwp.controls`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from enum import Enum

__all__ = [
    "Estimator",
    "Mode",
    "global_estimator",
    "global_mode",
    "override_thread",
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
    """Whether the finiteness checks run: layers' posteriors on every forward pass, the
    ELBO's terms (:func:`dwp.elbo`), :func:`dwp.predict`'s inputs and outputs."""
    return _state.validate


def set_validation(enabled: bool) -> None:
    """Turn the finiteness checks on or off: posterior parameters on every forward pass,
    the ELBO's terms before ``backward()``, :func:`dwp.predict`'s inputs and outputs.

    The check costs one reduction over the weights per layer.  On a GPU the layers queue
    their results and :func:`dwp.check_posteriors` reads them at the step's next
    synchronisation (:func:`dwp.elbo`, :func:`dwp.predict`), so it adds no synchronisation
    of its own; switch it off for production runs once training is known to be stable.
    """
    _state.validate = bool(enabled)


@contextlib.contextmanager
def override_thread(attribute: str, value: Enum) -> Iterator[None]:
    """Set the thread-wide ``estimator`` or ``mode`` override inside the block, restoring
    the previous one on exit (also on error)."""
    saved = getattr(_state, attribute)
    setattr(_state, attribute, value)
    try:
        yield
    finally:
        setattr(_state, attribute, saved)

"""The evidence lower bound: data term scaled to the full data set, plus the weighted KL.

For a data set of ``N`` observations-groups (images, volumes) and a minibatch of ``B``::

    loss = nll_sum * N / B + beta * KL(q || p)

``nll_sum`` is the minibatch's negative log-likelihood **summed** over everything observed
(every voxel of every volume; see :mod:`dwp.likelihoods`), and ``KL`` the sum of every
site's KL (an upper bound for implicit priors, making ``loss`` an upper bound on the
negative ELBO).  Its expectation over minibatches does not depend on ``B``.

Data parallelism
----------------
Under ``DistributedDataParallel`` each rank calls :func:`elbo` with its **local** batch
size and the full KL.  DDP averages gradients over the ``R`` ranks, so the data gradients
add up to ``N / (R * B_local) * sum_r grad nll_r`` (the global-batch estimate) and the KL
gradient, identical on every rank, is counted exactly once per global step.  When you
all-reduce gradients by *sum* instead of mean, divide the KL by ``R``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .amp import float32_only
from .convert import name_sites
from .nn import check_posteriors
from .posterior import MeanFieldNormal
from .priors import Prior
from .select import bayesian_layers
from .settings import validation_enabled

__all__ = [
    "DivergedLossError",
    "ELBOTerms",
    "KLSchedule",
    "LossGuard",
    "NonFiniteLossError",
    "elbo",
    "kl",
    "kl_per_site",
    "param_groups",
]


class NonFiniteLossError(FloatingPointError):
    """A term of the loss is NaN or infinite; raised before any gradient is computed, so the
    weights are still those of the last good step."""


class DivergedLossError(FloatingPointError):
    """The loss stayed finite but grew by orders of magnitude: the optimisation diverged."""


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def kl_per_site(model: nn.Module) -> dict[str, Tensor]:
    """KL(q || p) of every Bayesian layer, keyed by qualified layer name (for logging);
    float32 even inside autocast, as :func:`kl`."""
    name_sites(model)
    with float32_only(_device_of(model)):
        return {name: layer.kl() for name, layer in bayesian_layers(model)}


def kl(model: nn.Module) -> Tensor:
    """Sum of every Bayesian layer's KL (weights and Bayesian biases) in ``model``.

    Returns a scalar tensor (0 for a model without Bayesian layers).  Exact when every prior
    is exact, an upper bound when some prior's KL is a bound.  Sites whose priors share a
    :meth:`~dwp.priors.Prior.batch_key` (e.g. every layer of one deep-weight-prior group)
    are evaluated in one :meth:`~dwp.priors.Prior.kl_batch` call.

    Autocast is off inside (:func:`dwp.amp.float32_only`): a deep weight prior's bound runs
    its kernel VAE, whose layers mixed precision would otherwise lower to 16 bits.
    """
    with float32_only(_device_of(model)):
        return _kl(model)


def _kl(model: nn.Module) -> Tensor:
    name_sites(model)
    terms: list[Tensor] = []
    batches: dict[Hashable, tuple[Prior, list[MeanFieldNormal]]] = {}
    for _, layer in bayesian_layers(model):
        for prior, posterior in layer.sites():
            key = prior.batch_key()
            if key is None:
                terms.append(prior.kl(posterior))
            else:
                batches.setdefault(key, (prior, []))[1].append(posterior)
    terms += [prior.kl_batch(posteriors) for prior, posteriors in batches.values()]
    if not terms:
        return torch.zeros((), device=_device_of(model))
    return torch.stack(terms).sum()


@dataclass(frozen=True)
class ELBOTerms:
    """The terms of one minibatch estimate of the negative ELBO.

    Attributes
    ----------
    loss
        ``data_term + beta * kl``: minimise this.
    nll
        The minibatch's summed negative log-likelihood, as passed in.
    data_term
        ``nll * n_data / batch_size``: the full-data estimate.
    kl
        The unweighted KL (or its bound).
    beta
        The KL weight used.
    """

    loss: Tensor
    nll: Tensor
    data_term: Tensor
    kl: Tensor
    beta: float

    def as_dict(self) -> dict[str, float]:
        """Plain floats for logging."""
        return {
            "loss": float(self.loss.detach()),
            "nll": float(self.nll.detach()),
            "data_term": float(self.data_term.detach()),
            "kl": float(self.kl.detach()),
            "beta": float(self.beta),
        }


def elbo(
    nll: Tensor,
    model: nn.Module | None = None,
    *,
    n_data: int,
    batch_size: int,
    beta: float = 1.0,
    kl_value: Tensor | None = None,
) -> ELBOTerms:
    """Minibatch estimate of the negative ELBO, with its terms kept apart.

    Parameters
    ----------
    nll
        Negative log-likelihood of the minibatch, **summed** over all its observations
        (scalar tensor).
    model
        The network whose KL is added; omit it when passing ``kl_value``.
    n_data
        Number of training examples ``N`` (same unit as ``batch_size``).
    batch_size
        Number of examples ``B`` in this minibatch (the *local* one under DDP).
    beta
        KL weight (1 for the true ELBO; see :class:`KLSchedule`).
    kl_value
        A precomputed KL (e.g. to reuse it for logging); default ``dwp.kl(model)``.

    Raises
    ------
    NonFiniteLossError
        The data term, the KL or their sum is NaN or infinite; the message names the term,
        its value and (given ``model``) the first layer whose KL overflows.  Raised before
        the caller's ``backward()``, so no step is taken on it and the weights stay those
        of the last good step.  Skipped after ``dwp.set_validation(False)``.
    """
    if nll.dim() != 0:
        raise ValueError(
            f"nll must be a scalar (summed over the batch), got shape {tuple(nll.shape)}"
        )
    if not (n_data > 0 and batch_size > 0):
        raise ValueError(f"n_data and batch_size must be positive, got {n_data}, {batch_size}")
    if batch_size > n_data:
        raise ValueError(f"batch_size ({batch_size}) exceeds n_data ({n_data})")
    if beta < 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be finite and >= 0, got {beta}")
    if kl_value is None:
        if model is None:
            raise TypeError("elbo() needs a model or kl_value")
        kl_value = kl(model)
    data_term = nll * (n_data / batch_size)
    loss = data_term + beta * kl_value
    # Checked here, before the caller's backward(): an infinite KL's gradient would let the
    # optimiser write NaN into the weights, and the layers would only notice on the next
    # forward pass, with the model already corrupted.  A non-finite posterior is named
    # first (the checks its layers queued on an accelerator are read here, see
    # dwp.check_posteriors): it is the cause of a non-finite loss, not a second error.
    if validation_enabled():
        check_posteriors()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(_non_finite_message(nll, kl_value, model))
    return ELBOTerms(loss=loss, nll=nll, data_term=data_term, kl=kl_value, beta=beta)


def _non_finite_message(nll: Tensor, kl_value: Tensor, model: nn.Module | None) -> str:
    """Which term of a non-finite ELBO is bad, its value, the first layer to blame, a fix."""
    parts = []
    if not torch.isfinite(nll):
        parts.append(
            f"the data term is {nll.item()} (check the batch for NaN/inf values and the "
            "network for divergence: a lower learning rate, normalised inputs)"
        )
    if not torch.isfinite(kl_value):
        where = ""
        if model is not None:
            # Only on this failure path: one KL per layer, to name where it overflows.
            with torch.no_grad():
                bad = [n for n, v in kl_per_site(model).items() if not torch.isfinite(v)]
            where = f", first at layer {bad[0]!r}" if bad else ""
        parts.append(
            f"the KL is {kl_value.item()}{where} (posterior scales or means too large for "
            "the prior: lower the initial log-sigma or the learning rate)"
        )
    if not parts:  # both finite, their weighted sum overflowed
        parts.append(f"data term {nll.item():.3g} + KL {kl_value.item():.3g} overflows")
    return (
        f"non-finite ELBO: {'; '.join(parts)}; no gradient was taken, the weights are "
        "unchanged (dwp.set_validation(False) skips this check)"
    )


class LossGuard:
    """Stops a training run whose loss became non-finite or diverged, before its step.

    Call :meth:`check` on each minibatch's loss before ``backward()``: it raises
    :class:`NonFiniteLossError` for NaN / inf (what :func:`elbo` checks for its own terms,
    here for any loss) and :class:`DivergedLossError` once ``|loss|`` exceeds ``factor``
    times the first loss it saw (at least ``floor``).  A descent that works never climbs
    six orders of magnitude above where it started; an optimiser that overshoots does,
    long before it overflows.  The check costs one scalar read per step (the loss a
    training loop logs anyway).

    Watch a quantity that does not depend on the step's KL weight: for an ELBO, its
    ``data_term`` (a KL annealed up from 0 legitimately raises the total loss).

    Parameters
    ----------
    factor
        Growth over the first loss that counts as divergence (> 1).
    floor
        Smallest reference, in the loss's units: a first loss near 0 (a fine-tuned
        network) must not make every later fluctuation a divergence.

    Examples
    --------
    >>> guard = dwp.LossGuard()
    >>> terms = dwp.elbo(nll, model, n_data=N, batch_size=B)
    >>> guard.check(terms.data_term, step=step)
    >>> terms.loss.backward()
    """

    def __init__(self, factor: float = 1e6, floor: float = 1.0) -> None:
        if not (factor > 1 and math.isfinite(factor)):
            raise ValueError(f"factor must be finite and > 1, got {factor}")
        if not (floor > 0 and math.isfinite(floor)):
            raise ValueError(f"floor must be finite and > 0, got {floor}")
        self.factor, self.floor = float(factor), float(floor)
        self.reference: float | None = None

    def reset(self) -> None:
        """Forget the reference (a restart from other weights starts another descent)."""
        self.reference = None

    def check(self, loss: Tensor | float, step: int | None = None, name: str = "loss") -> float:
        """Raise if ``loss`` is non-finite or has diverged; return it as a float.

        Raises
        ------
        NonFiniteLossError
            ``loss`` is NaN or infinite.
        DivergedLossError
            ``|loss| > factor * max(|first loss|, floor)``.
        """
        value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        at = "" if step is None else f" at step {step}"
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"the {name} is {value}{at}: lower the learning rate, check the inputs for "
                "NaN/inf; no gradient was taken from it"
            )
        if self.reference is None:
            self.reference = value
            return value
        limit = self.factor * max(abs(self.reference), self.floor)
        if abs(value) > limit:
            raise DivergedLossError(
                f"the {name} diverged{at}: {value:.3g}, more than {self.factor:.0e} times "
                f"its first value {self.reference:.3g}; lower the learning rate or normalise "
                "the inputs"
            )
        return value


class KLSchedule:
    """KL weight ``beta`` as a function of the optimisation step (KL annealing).

    Parameters
    ----------
    kind
        ``"constant"`` (``end`` throughout), ``"linear"`` or ``"cosine"`` ramps from
        ``start`` to ``end``, or ``"log_linear"``: geometric growth from ``start`` (> 0) to
        ``end``, for warm-ups that start many orders of magnitude below 1 (Kuzina et al.'s
        trainer started at 1e-9).
    start, end
        Weight at step 0 and after ``steps`` steps (held from then on).
    steps
        Length of the ramp.

    Examples
    --------
    >>> schedule = KLSchedule("log_linear", start=1e-6, end=1.0, steps=1000)
    >>> terms = dwp.elbo(nll, model, n_data=N, batch_size=B, beta=schedule(step))
    """

    def __init__(
        self,
        kind: Literal["constant", "linear", "cosine", "log_linear"] = "linear",
        start: float = 0.0,
        end: float = 1.0,
        steps: int = 1000,
    ) -> None:
        if kind not in ("constant", "linear", "cosine", "log_linear"):
            raise ValueError(f"unknown KL schedule {kind!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if min(start, end) < 0:
            raise ValueError("KL weights must be >= 0")
        if kind == "log_linear" and not (start > 0 and end > 0):
            raise ValueError("a log_linear schedule needs start > 0 and end > 0")
        self.kind, self.start, self.end, self.steps = kind, float(start), float(end), int(steps)

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.end
        t = min(max(step, 0) / self.steps, 1.0)
        if self.kind == "linear":
            return self.start + t * (self.end - self.start)
        if self.kind == "cosine":
            return self.end + 0.5 * (self.start - self.end) * (1 + math.cos(math.pi * t))
        return math.exp(math.log(self.start) + t * (math.log(self.end) - math.log(self.start)))

    def __repr__(self) -> str:
        return (
            f"KLSchedule({self.kind!r}, start={self.start:g}, end={self.end:g}, steps={self.steps})"
        )


def param_groups(
    model: nn.Module, lr: float, scale_lr: float | None = None, **options: float
) -> list[dict]:
    """Optimiser parameter groups with a separate learning rate for posterior scales.

    The entropy term's gradient on every ``log_sigma`` is a constant that Adam turns into a
    steady rise of about ``lr`` per step, whatever its size; a smaller ``scale_lr`` keeps
    the weight noise in check early in training.  Parameters with ``requires_grad=False``
    (e.g. a frozen kernel-VAE decoder) are left out, so they never reach the optimiser.

    Weight decay (an optimiser's ``weight_decay``) applies to the means and other
    parameters only: on a log-sigma it would pull sigma towards 1, on a prior's learned
    scale factor (``log_scale_factor``, empirical Bayes) towards 1 too.

    Returns
    -------
    list of dict
        ``[{"params": means and other parameters, "lr": lr}, {"params": log-sigmas,
        "lr": scale_lr, "weight_decay": 0}, {"params": prior scale factors, "lr": lr,
        "weight_decay": 0}]`` (empty groups left out), for
        ``torch.optim.Adam(param_groups(...))``.
    """
    scales, factors, others = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("_log_sigma"):
            scales.append(p)
        elif name.endswith("log_scale_factor"):
            factors.append(p)
        else:
            others.append(p)
    no_decay = {**options, "weight_decay": 0.0}
    groups = [{"params": others, "lr": lr, **options}]
    if scales:
        groups.append({"params": scales, "lr": lr if scale_lr is None else scale_lr, **no_decay})
    if factors:
        groups.append({"params": factors, "lr": lr, **no_decay})
    return groups

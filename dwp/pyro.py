"""Pyro interop: ``dwp`` priors as Pyro distributions, and ``dwp`` networks as Pyro models.

Two ways in:

* **A dwp prior on a Pyro weight.**  :func:`prior_distribution` turns a prior into a
  distribution over one weight tensor, usable in ``PyroSample``.  Gaussian priors become
  native Pyro ``Normal`` sites (Pyro's own analytic KL applies); any other prior becomes a
  :class:`PriorDistribution`, whose KL against a Normal guide site is registered with
  ``torch.distributions.kl.register_kl`` (used by ``TraceMeanField_ELBO``) and whose
  ``log_prob`` is the prior's (a lower bound for implicit priors; used by ``Trace_ELBO``).
  The guide must emit ``Normal(...).to_event()`` sites: Pyro's ``AutoNormal`` records
  ``Delta`` sites, with which ``TraceMeanField_ELBO`` never calls a registered KL.
* **A dwp network as a Pyro model/guide pair.**  :class:`PyroBNN` wraps a network made with
  :func:`dwp.bayesianize`: its guide samples every Bayesian layer's weight from the layer's
  own posterior parameters, its model from the layer's prior, so ``SVI`` optimises the same
  parameters as the native :func:`dwp.elbo` loss, and for the same weight sample the two
  losses are equal.  (For implicit priors such as the deep weight prior, Pyro also
  evaluates every model site's ``log_prob`` -- a VAE pass whose result
  ``TraceMeanField_ELBO`` discards when a KL is registered -- which costs time and
  consumes random numbers: the losses then agree in expectation, not draw for draw.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch import Tensor, nn
from torch.distributions import Independent, Normal, constraints
from torch.distributions.kl import register_kl
from torch.func import functional_call

from .controls import sampling
from .convert import name_sites
from .posterior import MeanFieldNormal
from .priors import NormalPrior, PretrainedNormalPrior, Prior
from .select import bayesian_layers

__all__ = ["PriorDistribution", "PyroBNN", "prior_distribution"]


class PriorDistribution(TorchDistribution):
    """A :class:`dwp.priors.Prior` as a Pyro distribution over one weight tensor.

    Parameters
    ----------
    prior
        A prior already bound to its site (see ``Prior.for_site``).
    shape
        The weight's shape (the event shape).
    name
        The site's name, for error messages and group-dependent priors.
    kernel_dims
        Trailing dimensions of the weight that form one spatial kernel.
    """

    arg_constraints: ClassVar[dict] = {}
    support = constraints.real
    has_rsample = False

    def __init__(
        self,
        prior: Prior,
        shape: torch.Size | tuple[int, ...],
        name: str = "<pyro>",
        kernel_dims: int = 0,
        validate_args: bool | None = None,
    ) -> None:
        self.prior, self.site_name, self.kernel_dims = prior, name, kernel_dims
        super().__init__(torch.Size(), torch.Size(shape), validate_args=validate_args)

    def log_prob(self, value: Tensor) -> Tensor:
        """The prior's log density summed over the event (leading dims are batch dims)."""
        batch = value.shape[: value.dim() - len(self.event_shape)]
        flat = value.reshape(-1, *self.event_shape)
        return torch.stack([self.prior.log_prob(v) for v in flat]).reshape(batch)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        shape = torch.Size(sample_shape)
        draws = [self.prior.sample(self.event_shape) for _ in range(shape.numel())]
        return torch.stack(draws).reshape(*shape, *self.event_shape)

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) != torch.Size():
            raise NotImplementedError("PriorDistribution is a single weight tensor; use .to_event")
        return self


@register_kl(Independent, PriorDistribution)
def _kl_normal_prior(q: Independent, p: PriorDistribution) -> Tensor:
    base = q.base_dist
    if not isinstance(base, Normal) or base.loc.shape != p.event_shape:
        raise NotImplementedError  # TraceMeanField_ELBO then falls back on sampling
    posterior = MeanFieldNormal(base.loc, base.scale.log(), p.site_name, p.kernel_dims)
    return p.prior.kl(posterior)


def prior_distribution(
    prior: Prior, weight: Tensor, name: str = "<pyro>", kernel_dims: int = 0
) -> TorchDistribution:
    """The Pyro distribution of ``prior`` over a parameter shaped like ``weight``.

    The prior template is first bound to the site (``prior.for_site(name, weight, ...)``),
    so a :class:`~dwp.priors.PretrainedNormalPrior` takes ``weight`` as its centre and a
    shape mismatch raises :class:`~dwp.priors.PriorMismatchError` naming ``name``.
    """
    bound = prior.for_site(name, weight.detach(), kernel_dims)
    return _as_distribution(bound, weight.shape, name, kernel_dims)


def _as_distribution(
    prior: Prior, shape: torch.Size, name: str, kernel_dims: int
) -> TorchDistribution:
    """The distribution of a prior already bound to its site."""
    if isinstance(prior, (NormalPrior, PretrainedNormalPrior)):
        return dist.Normal(prior.loc, prior.stddev).expand(shape).to_event(len(shape))
    return PriorDistribution(prior, shape, name, kernel_dims)


class PyroBNN:
    """A ``dwp`` Bayesian network as a Pyro ``model`` / ``guide`` pair.

    The guide registers the network with ``pyro.module`` and samples each Bayesian layer's
    weight (and Bayesian bias) from ``Normal(weight, exp(weight_log_sigma))``; the model
    samples them from the layers' priors and runs the network on them (everything else,
    e.g. norm layers and deterministic biases, stays a plain parameter).  Observations are
    scored by ``likelihood(output)`` inside a plate of ``n_data`` examples subsampled to the
    batch, so the minibatch log-likelihood is scaled by ``N / B`` exactly as in
    :func:`dwp.elbo`.

    Parameters
    ----------
    net
        A network with Bayesian layers (e.g. from :func:`dwp.bayesianize`).
    likelihood
        Maps the network output ``(B, *)`` to a distribution over one batch of targets with
        batch shape ``(B, *)``; e.g. ``lambda out: dist.Normal(out, 0.1)``.
    n_data
        Training set size ``N``; default: the batch size (no scaling).
    name
        Prefix of the Pyro parameter and sample sites.

    Examples
    --------
    >>> bnn = PyroBNN(net, lambda out: dist.Normal(out, 0.1), n_data=len(dataset))
    >>> svi = pyro.infer.SVI(bnn.model, bnn.guide, pyro.optim.Adam({"lr": 1e-3}),
    ...                      pyro.infer.TraceMeanField_ELBO())
    """

    def __init__(
        self,
        net: nn.Module,
        likelihood: Callable[[Tensor], dist.Distribution],
        n_data: int | None = None,
        name: str = "bnn",
    ) -> None:
        self.net, self.likelihood, self.n_data, self.name = (
            name_sites(net),
            likelihood,
            n_data,
            name,
        )
        self.sites = []  # (parameter path, layer, role)
        for layer_name, layer in bayesian_layers(net):
            prefix = f"{layer_name}." if layer_name else ""
            self.sites.append((f"{prefix}weight", layer, "weight"))
            if layer.bayesian_bias:
                self.sites.append((f"{prefix}bias", layer, "bias"))
        if not self.sites:
            raise ValueError(
                f"{type(net).__name__} has no Bayesian layers; use dwp.bayesianize first"
            )

    def _site(self, path: str) -> str:
        return f"{self.name}.{path}"

    def model(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Prior over the Bayesian weights, then the likelihood of ``y``."""
        weights = {}
        for path, layer, role in self.sites:
            prior = layer.weight_prior if role == "weight" else layer.bias_prior
            posterior = layer.weight_posterior if role == "weight" else layer.bias_posterior
            fn = _as_distribution(prior, posterior.shape, posterior.name, posterior.kernel_dims)
            weights[path] = pyro.sample(self._site(path), fn)
        with sampling(False, self.net):  # the sampled weights replace the posterior means
            out = functional_call(self.net, weights, (x,))
        n_data = len(x) if self.n_data is None else self.n_data
        # the batch is the subsample: the plate only scales by N / B (explicit indices keep
        # Pyro from drawing a random permutation every step)
        with pyro.plate(f"{self.name}.data", n_data, subsample=torch.arange(len(x))):
            likelihood = self.likelihood(out)
            extra = len(likelihood.batch_shape) - 1
            pyro.sample(f"{self.name}.obs", likelihood.to_event(extra), obs=y)
        return out

    def guide(self, x: Tensor, y: Tensor | None = None) -> None:
        """Mean-field Normal sites on the network's own posterior parameters."""
        pyro.module(self.name, self.net)
        for path, layer, role in self.sites:
            posterior = layer.weight_posterior if role == "weight" else layer.bias_posterior
            fn = dist.Normal(posterior.loc, posterior.scale).to_event(posterior.loc.dim())
            pyro.sample(self._site(path), fn)

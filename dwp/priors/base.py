"""The prior interface shared by every weight prior in :mod:`dwp.priors`."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from ..posterior import MeanFieldNormal

__all__ = ["KLKind", "Prior", "PriorMismatchError"]


class PriorMismatchError(ValueError):
    """A prior does not fit the parameter it is attached to (shape, group, kind)."""


class KLKind(str, Enum):
    """What ``Prior.kl`` returns."""

    EXACT = "exact"
    """The closed-form KL(q || p)."""
    UPPER_BOUND = "upper_bound"
    """A (stochastic) upper bound on KL(q || p); the ELBO built from it is a lower bound."""
    APPROXIMATION = "approximation"
    """A fitted approximation with no bound guarantee (e.g. the log-uniform prior's)."""


class Prior(nn.Module):
    """A prior over the weights of one site, with the KL interface the ELBO uses.

    Priors are modules so that their state (centres, scales, a kernel VAE) travels in the
    model's ``state_dict``.  A prior object passed to :func:`dwp.bayesianize` or to a layer
    is a *template*: :meth:`for_site` turns it into the prior of one concrete site (and
    checks that it fits).

    Subclasses implement :meth:`kl` and set :attr:`kl_kind`; :meth:`log_prob` and
    :meth:`sample` are optional.
    """

    kl_kind: KLKind = KLKind.EXACT
    #: ``kl`` is a Monte Carlo estimate over weight samples and uses the layer's forward
    #: sample when the posterior carries one (:attr:`MeanFieldNormal.sample`)
    shares_weight_sample: bool = False

    @property
    def is_bound(self) -> bool:
        """``True`` when :meth:`kl` is an upper bound rather than the exact KL."""
        return self.kl_kind is KLKind.UPPER_BOUND

    @property
    def is_exact(self) -> bool:
        return self.kl_kind is KLKind.EXACT

    def kl(self, posterior: MeanFieldNormal) -> Tensor:
        """KL(q || p) for one site, **summed** over all its weights (a scalar tensor)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement kl()")

    def batch_key(self) -> Hashable | None:
        """Sites whose priors return the same (non-``None``) key are evaluated together by
        one :meth:`kl_batch` call in :func:`dwp.kl` (e.g. all layers sharing a kernel VAE,
        which then runs once per step instead of once per layer)."""
        return None

    def kl_batch(self, posteriors: Sequence[MeanFieldNormal]) -> Tensor:
        """Sum of :meth:`kl` over several sites that share this prior's :meth:`batch_key`."""
        return torch.stack([self.kl(p) for p in posteriors]).sum()

    def log_prob(self, value: Tensor) -> Tensor:
        """log p(value), summed over the site (a lower bound for implicit priors)."""
        raise NotImplementedError(f"{type(self).__name__} has no log_prob()")

    def sample(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """Draw one weight tensor of ``shape`` from the prior (used by ``init="prior"``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be sampled")

    def for_site(self, name: str, weight: Tensor, kernel_dims: int) -> Prior:
        """The prior for the site ``name`` whose current weight is ``weight``.

        The default shares this prior between all sites.  Priors that hold per-site state
        (e.g. a pretrained centre) or per-group state (a kernel VAE) override it, and raise
        :class:`PriorMismatchError` naming the site when the prior does not fit.
        """
        return self

    # Validated state: loading a checkpoint saved with another kind of prior fails loudly,
    # naming the layer, instead of silently keeping the wrong prior.
    def get_extra_state(self) -> dict[str, Any]:
        return {"prior_type": type(self).__qualname__}

    def set_extra_state(self, state: Any) -> None:
        """Checked in ``_load_from_state_dict``, where the layer's name is known."""

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        state = state_dict.get(prefix + "_extra_state")
        if state is not None:
            saved = state if isinstance(state, dict) else {"prior_type": state}
            # every field a prior records (its type; e.g. a deep prior's group and VAE
            # configuration) must match, or the checkpoint belongs to another prior
            for key, value in self.get_extra_state().items():
                if saved.get(key) != value:
                    error_msgs.append(
                        f"prior mismatch for {prefix.rstrip('.')!r}: the checkpoint's {key} is "
                        f"{saved.get(key)!r}, the model's {value!r}"
                    )
                    return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

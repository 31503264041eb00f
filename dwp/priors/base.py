"""The prior interface shared by every weight prior in :mod:`dwp.priors`."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from ..posterior import MeanFieldNormal
from .files import PriorFileError, load_prior, register, save_prior

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

    Subclasses implement :meth:`kl` and set :attr:`kl_kind`, :meth:`log_prob` and
    :meth:`sample` (so ``init="prior"`` works), and :meth:`config` (so the prior saves to
    one file, :meth:`save`); :meth:`describe` says what the prior is and how it was fitted.
    Every subclass is registered by name when it is defined, so :func:`dwp.priors.load_prior`
    can read any prior file.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        register(cls)

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
        """Draw one weight tensor of ``shape`` from the prior."""
        raise NotImplementedError(f"{type(self).__name__} cannot be sampled")

    def init_sample(self, shape: torch.Size | tuple[int, ...]) -> Tensor | None:
        """The weights ``init="prior"`` starts from: a sample (:meth:`sample`) for priors
        that say what a trained weight looks like (fitted from source material); priors
        that do not (an isotropic N(0, 1), an improper log-uniform) return ``None`` and the
        layer keeps torch's initialisation."""
        return self.sample(shape)

    # -- what the prior is, and its file ------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What the prior is and how it was fitted, as plain values: ``kind``, ``kl_kind``,
        its configuration and, for fitted priors, the provenance in ``metadata``."""
        try:
            config = self.config()
        except NotImplementedError:
            config = {}
        return {
            "kind": type(self).__name__,
            "kl_kind": self.kl_kind.value,
            "config": config,
            "metadata": dict(getattr(self, "metadata", {}) or {}),
        }

    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this prior (plain values; its tensors
        travel in ``state_dict``): what :meth:`save` stores."""
        raise NotImplementedError(f"{type(self).__name__} does not implement config()")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], state: Mapping[str, Tensor]) -> Prior:
        """The prior :meth:`config` and ``state_dict`` describe (what :meth:`load` calls)."""
        prior = cls(**config)
        prior.load_state_dict(dict(state), strict=True)
        return prior

    def save(self, path: str | os.PathLike) -> None:
        """Write the prior to one file, atomically (:func:`dwp.priors.save_prior`)."""
        save_prior(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, **overrides: Any) -> Prior:
        """Read a prior file (:func:`dwp.priors.load_prior`); called on a subclass, the file
        must hold that kind of prior."""
        prior = load_prior(path, **overrides)
        if not isinstance(prior, cls):
            raise PriorFileError(f"{path}: holds a {type(prior).__name__}, not a {cls.__name__}")
        return prior

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

"""SWA moments of a network's weights along its training trajectory (SWAG).

Maddox et al. (2019, "A Simple Baseline for Bayesian Uncertainty in Deep Learning")
summarise the iterates ``w_1 .. w_n`` of SGD by their running mean, their running second
moment and the last ``K`` deviations from the running mean; "Pre-Train Your Loss"
(Shwartz-Ziv et al. 2022) makes them the prior of a downstream task
(:class:`dwp.priors.SWAGPrior`).  :class:`SWAGMoments` collects them for chosen layers of
any network; when to take a snapshot (every ``k`` steps after a start) is the training
loop's choice.  :data:`SWAG_FILE` is its file, which :func:`dwp.priors.load_prior` also
reads, as the :class:`~dwp.priors.SWAGPrior` of the moments.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .io import FileFormat, LibraryFileError
from .nn import BayesianLayer, bayesian_twin
from .priors.files import register_format
from .priors.swag import SWAGPrior
from .select import LayerSelector, LayerSpec, model_layers

__all__ = ["SWAG_FILE", "SWAGMoments", "SWAGMomentsError"]


class SWAGMomentsError(LibraryFileError):
    """A SWAG moments file is unreadable, of another kind or inconsistent."""


#: The SWAG moments file (:meth:`SWAGMoments.save`): the entries of ``state_dict``.
SWAG_FILE = FileFormat(
    tag="dwp.SWAGMoments",
    version=1,
    keys=("layers", "rank", "n_snapshots", "variance_floor", "mean", "sq_mean", "deviations"),
    error=SWAGMomentsError,
    what="SWAG moments",
)

#: The moments are kept in float64: the variance ``E[w^2] - E[w]^2`` of weights ~0.1 that
#: move by ~1e-4 is a difference of two numbers 1e6 times larger than it, which float32
#: (7 digits) would lose.  The deviations are differences already: float32 keeps them.
_MOMENT_DTYPE = torch.float64
_DEVIATION_DTYPE = torch.float32


class SWAGMoments:
    """Running SWA moments of chosen weight tensors, keyed by qualified layer name.

    After ``n`` snapshots ``w_1 .. w_n`` (:meth:`update`) it holds, per layer, the mean
    ``E[w]``, the second moment ``E[w^2]`` (both running averages) and the last
    ``K = min(n, rank)`` deviation columns ``w_i - mean_i`` (``mean_i``: the mean after
    snapshot ``i``), from which :meth:`variance` is ``max(E[w^2] - E[w]^2, variance_floor)``.

    Parameters
    ----------
    layers
        Layer name -> weight shape (:meth:`for_model` reads them from a network).
    rank
        Deviation columns kept (SWAG's ``K``; 0 keeps only the diagonal).
    variance_floor
        Smallest variance reported (weights that never moved).
    device
        Where the moments live; snapshots are copied there.
    """

    def __init__(
        self,
        layers: Mapping[str, Sequence[int]],
        rank: int = 5,
        *,
        variance_floor: float = 1e-12,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(rank, bool) or int(rank) != rank or rank < 0:
            raise ValueError(f"SWAGMoments needs an integer rank >= 0, got {rank!r}")
        if not variance_floor > 0:
            raise ValueError(f"SWAGMoments needs variance_floor > 0, got {variance_floor!r}")
        if not layers:
            raise ValueError("SWAGMoments needs at least one layer")
        self.layers = {str(k): torch.Size(int(s) for s in v) for k, v in layers.items()}
        self.rank, self.variance_floor = int(rank), float(variance_floor)
        self.n_snapshots = 0
        sizes = {name: math.prod(shape) for name, shape in self.layers.items()}
        moment = {"dtype": _MOMENT_DTYPE, "device": device}
        self._mean = {n: torch.zeros(d, **moment) for n, d in sizes.items()}
        self._sq_mean = {n: torch.zeros(d, **moment) for n, d in sizes.items()}
        self._deviations = {
            n: torch.zeros(self.rank, d, dtype=_DEVIATION_DTYPE, device=device)
            for n, d in sizes.items()
        }

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        rank: int = 5,
        *,
        include: LayerSpec = None,
        exclude: LayerSpec = None,
        variance_floor: float = 1e-12,
    ) -> SWAGMoments:
        """Moments of the weights of ``model``'s conv / linear layers (torch or Bayesian:
        a Bayesian layer's ``weight`` is its posterior mean), on the weights' device.

        ``include`` / ``exclude`` choose layers as in :func:`dwp.bayesianize`; a name
        pattern of ``include`` that matches no such layer is an error.
        """
        included = LayerSelector(include, "include")
        excluded = LayerSelector(exclude, "exclude", default=False)
        chosen: dict[str, nn.Module] = {}
        candidates = []
        for name, layer in model_layers(model):
            if isinstance(layer, BayesianLayer) or bayesian_twin(type(layer)) is not None:
                candidates.append(name)
                if included(name, layer) and not excluded(name, layer):
                    chosen[name] = layer
        unused = included.unused_patterns(candidates)
        where = type(model).__name__
        if unused:
            raise ValueError(f"include patterns {unused} match no conv / linear layer of {where}")
        if not chosen:
            raise ValueError(f"{where} has no conv / linear layer to collect")
        device = next(iter(chosen.values())).weight.device
        shapes = {name: layer.weight.shape for name, layer in chosen.items()}
        return cls(shapes, rank, variance_floor=variance_floor, device=device)

    # -- collecting -----------------------------------------------------------------------
    def _snapshot(self, model: nn.Module) -> dict[str, Tensor]:
        """The flat float64 weights of every layer, checked before anything changes."""
        weights = {}
        for name, shape in self.layers.items():
            try:
                weight = model.get_submodule(name).weight
            except AttributeError as error:
                raise ValueError(
                    f"SWAGMoments: the model has no layer {name!r} with a weight "
                    f"(the moments were set up for another network?): {error}"
                ) from error
            if weight.shape != shape:
                raise ValueError(
                    f"SWAGMoments: layer {name!r} has a weight of shape {tuple(weight.shape)}, "
                    f"the moments {tuple(shape)}"
                )
            flat = self._mean[name]
            weights[name] = weight.detach().reshape(-1).to(flat.device, _MOMENT_DTYPE)
        return weights

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Add the current weights of ``model`` as the next snapshot.

        ``mean <- (n mean + w) / (n + 1)``, likewise ``E[w^2]``; then ``w - mean`` replaces
        the oldest of the ``rank`` deviation columns.
        """
        weights = self._snapshot(model)
        n = self.n_snapshots
        for name, w in weights.items():
            mean = self._mean[name].mul_(n / (n + 1)).add_(w / (n + 1))
            self._sq_mean[name].mul_(n / (n + 1)).add_(w.square() / (n + 1))
            if self.rank:  # a ring buffer: column n % rank is the oldest
                self._deviations[name][n % self.rank] = w - mean
        self.n_snapshots = n + 1

    def reset(self) -> None:
        """Forget every snapshot (a new trajectory, e.g. after a learning-rate restart)."""
        for tensors in self._stores().values():
            for value in tensors.values():
                value.zero_()
        self.n_snapshots = 0

    def _stores(self) -> dict[str, dict[str, Tensor]]:
        """The per-layer tensors by their ``state_dict`` key."""
        return {"mean": self._mean, "sq_mean": self._sq_mean, "deviations": self._deviations}

    # -- the moments ----------------------------------------------------------------------
    def _layer(self, name: str) -> str:
        if name not in self.layers:
            raise KeyError(f"no SWAG moments for layer {name!r} (layers: {list(self.layers)})")
        return name

    def mean(self, name: str) -> Tensor:
        """``E[w]`` of the layer, its weight's shape (float64)."""
        return self._mean[self._layer(name)].reshape(self.layers[name])

    def variance(self, name: str) -> Tensor:
        """``max(E[w^2] - E[w]^2, variance_floor)``, the weight's shape (float64)."""
        mean = self._mean[self._layer(name)]
        variance = (self._sq_mean[name] - mean.square()).clamp_min(self.variance_floor)
        return variance.reshape(self.layers[name])

    def deviations(self, name: str) -> Tensor:
        """The last ``K = min(n_snapshots, rank)`` deviations ``w_i - mean_i``, oldest first:
        ``(K, *shape)`` (float32)."""
        stored = self._deviations[self._layer(name)]
        k = min(self.n_snapshots, self.rank)
        oldest = self.n_snapshots % self.rank if self.n_snapshots >= self.rank > 0 else 0
        ordered = torch.cat([stored[oldest:k], stored[:oldest]])
        return ordered.reshape(k, *self.layers[name])

    # -- state and file -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything that continues the collection bit for bit (plain values and tensors;
        the tensors are the collector's own, not copies)."""
        return {
            "layers": {name: list(shape) for name, shape in self.layers.items()},
            "rank": self.rank,
            "n_snapshots": self.n_snapshots,
            "variance_floor": self.variance_floor,
            **{key: dict(tensors) for key, tensors in self._stores().items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (of :meth:`state_dict`); the layers, their shapes, the
        rank and the floor must be this collector's.  Tensors are copied onto its device.

        Raises
        ------
        ValueError
            Another set-up, or tensors of other shapes (naming the layer).
        """
        setup = {
            "layers": {name: list(shape) for name, shape in self.layers.items()},
            "rank": self.rank,
            "variance_floor": self.variance_floor,
        }
        changed = [key for key, value in setup.items() if state.get(key) != value]
        if changed:
            diff = "; ".join(f"{k}: {state.get(k)!r} here {setup[k]!r}" for k in changed)
            raise ValueError(f"SWAG moments of another set-up ({diff})")
        for key, own in self._stores().items():
            given = state[key]
            for name, tensor in own.items():
                value = given.get(name) if isinstance(given, Mapping) else None
                if not isinstance(value, Tensor) or value.shape != tensor.shape:
                    shape = None if not isinstance(value, Tensor) else tuple(value.shape)
                    raise ValueError(
                        f"SWAG moments: {key} of layer {name!r} is {shape}, "
                        f"expected {tuple(tensor.shape)}"
                    )
        # copied only once every tensor fits: a failed load leaves the collector as it was
        for key, own in self._stores().items():
            for name, tensor in own.items():
                tensor.copy_(state[key][name])
        self.n_snapshots = int(state["n_snapshots"])

    def save(self, path: str | os.PathLike) -> None:
        """Write the moments to one file (:data:`SWAG_FILE`), atomically."""
        state = self.state_dict()
        for key in self._stores():
            state[key] = {name: t.detach().cpu() for name, t in state[key].items()}
        SWAG_FILE.save(state, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SWAGMoments:
        """Read a moments file (on the CPU).

        Raises
        ------
        SWAGMomentsError
            A truncated or corrupt file (also a :class:`dwp.io.CorruptFileError`), NaN or
            infinite moments, not a moments file, a newer version, or inconsistent entries
            (naming the file).
        """
        return cls._from_payload(SWAG_FILE.load(path), path)

    @classmethod
    def _from_payload(cls, payload: Any, path: str | os.PathLike) -> SWAGMoments:
        """The moments of a checked file's contents (:meth:`load`, :func:`load_prior`)."""
        try:
            moments = cls(
                payload["layers"], payload["rank"], variance_floor=payload["variance_floor"]
            )
            moments.load_state_dict(payload)
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            raise SWAGMomentsError(f"{path}: inconsistent SWAG moments: {error}") from error
        return moments

    def __repr__(self) -> str:
        return (
            f"SWAGMoments(layers={len(self.layers)}, rank={self.rank}, "
            f"n_snapshots={self.n_snapshots})"
        )


def _load_prior(payload: Any, path: str | os.PathLike, **overrides: Any) -> SWAGPrior:
    """A moments file read by :func:`dwp.priors.load_prior`: the prior of its moments."""
    return SWAGPrior.from_moments(SWAGMoments._from_payload(payload, path), **overrides)


register_format(SWAG_FILE, _load_prior)

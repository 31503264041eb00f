"""Choosing layers of a model, and finding its Bayesian layers.

One parser for every ``include=`` / ``exclude=`` argument of the library
(:func:`dwp.bayesianize`, :func:`dwp.init_from_prior_`, :func:`dwp.collect_kernels`), so
they accept the same things and say the same thing when a pattern matches nothing; and
one walk over a model's Bayesian layers (:func:`bayesian_layers`) that never enters a
prior: a deep weight prior's VAE is made of ``nn.Linear`` / ``nn.Conv3d`` modules, and
those are the prior's internals, never layers of the model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator

from torch import nn

from .nn import BayesianLayer
from .priors import Prior

__all__ = ["LayerSelector", "LayerSpec", "bayesian_layers", "model_layers"]

#: What ``include=`` / ``exclude=`` accept: qualified-name glob patterns (``"encoder.*"``),
#: layer types (``nn.Conv3d``), a mix of both in a list or tuple, or a predicate.
LayerSpec = str | type | Iterable[str | type] | Callable[..., bool] | None


class LayerSelector:
    """A parsed ``include=`` / ``exclude=`` argument.

    Parameters
    ----------
    spec
        ``None`` (every layer), a glob pattern on qualified names, a layer type, an
        iterable mixing patterns and types (a layer matches if any entry does), or a
        predicate.  The predicate takes ``(name, module)``, or ``(name,)`` where there
        are no modules to show it (``takes_module=False``: the layers of a state dict).
    argument
        The argument's name, for messages (``"include"``).
    takes_module
        Whether a predicate gets the module; types need modules, so with ``False`` a type
        in ``spec`` is an error.
    default
        What a ``spec`` of ``None`` selects: every layer (``True``, for ``include=``) or
        none (``False``, for ``exclude=``).
    """

    def __init__(
        self,
        spec: LayerSpec,
        argument: str = "include",
        *,
        takes_module: bool = True,
        default: bool = True,
    ) -> None:
        self.spec = spec
        self.default = default
        self.argument = argument
        self.takes_module = takes_module
        self.predicate: Callable[..., bool] | None = None
        patterns: list[str] = []
        types: list[type] = []
        if spec is not None and not isinstance(spec, (str, type)) and callable(spec):
            self.predicate = spec
        elif spec is not None:
            entries = [spec] if isinstance(spec, (str, type)) else list(spec)
            for entry in entries:
                if isinstance(entry, str):
                    patterns.append(entry)
                elif isinstance(entry, type) and takes_module:
                    types.append(entry)
                else:
                    allowed = "name patterns, layer types" if takes_module else "name patterns"
                    raise TypeError(f"{argument} must be {allowed} or a predicate, got {spec!r}")
        self.patterns: tuple[str, ...] = tuple(patterns)
        self.types: tuple[type, ...] = tuple(types)

    @property
    def exact_names(self) -> frozenset[str]:
        """Patterns without wildcards: layers named exactly."""
        return frozenset(p for p in self.patterns if not any(c in p for c in "*?["))

    def matches_name(self, name: str) -> bool:
        """Whether a name pattern matches ``name``."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def __call__(self, name: str, module: nn.Module | None = None) -> bool:
        """Whether the layer ``name`` (the module ``module``) is selected."""
        if self.spec is None:
            return self.default
        if self.predicate is not None:
            return bool(self.predicate(name, module) if self.takes_module else self.predicate(name))
        return self.matches_name(name) or (module is not None and isinstance(module, self.types))

    def unused_patterns(self, names: Iterable[str]) -> list[str]:
        """The name patterns that match none of ``names`` (usually typos)."""
        names = list(names)
        return [p for p in self.patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]

    def __repr__(self) -> str:
        return f"LayerSelector({self.argument}={self.spec!r})"


def model_layers(
    model: nn.Module, *, remove_duplicate: bool = True
) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` without descending into priors.

    A :class:`~dwp.priors.Prior` held by a layer (a deep weight prior's kernel VAEs) is
    made of torch modules too, but they are the prior's internals: converting them,
    initialising them or collecting their kernels would silently change the prior.
    """
    stack: list[tuple[str, nn.Module]] = [("", model)]
    seen: set[int] = set()
    while stack:
        name, module = stack.pop()
        if remove_duplicate:
            if id(module) in seen:
                continue
            seen.add(id(module))
        yield name, module
        # _modules, not named_children(): the latter drops a module registered twice
        children = [
            (f"{name}.{child_name}" if name else child_name, child)
            for child_name, child in module._modules.items()
            if child is not None and not isinstance(child, Prior)
        ]
        stack.extend(reversed(children))  # depth first, in registration order


def bayesian_layers(model: nn.Module) -> list[tuple[str, BayesianLayer]]:
    """``(qualified name, layer)`` for every Bayesian layer of ``model`` (itself included),
    in module order, each layer once; layers inside priors are not the model's."""
    return [(n, m) for n, m in model_layers(model) if isinstance(m, BayesianLayer)]

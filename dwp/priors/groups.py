"""Kernel priors with groups: which group a layer belongs to, and whether its kernels fit.

A prior over convolution kernels fitted on a kernel bank (the deep weight prior's VAEs,
the kernel Gaussian's means and covariances) holds one distribution per *group* of
layers (e.g. the MRI paper's 7 resolution groups) and must map a target network's layer
names to those groups.  :class:`KernelGroups` is that mapping and the checks made when a
template prior is bound to a layer, written once for every such prior.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from ..posterior import MeanFieldNormal
from .base import Prior, PriorMismatchError

__all__ = [
    "GroupModules",
    "GroupParameters",
    "KernelGroups",
    "LayerGroups",
    "check_kernel_shape",
    "layer_groups_config",
]

#: Layer name -> group: a mapping (keys may be glob patterns), a function returning a group
#: name or ``None``, or ``None`` (every layer belongs to the only group, if there is one).
LayerGroups = Mapping[str, str] | Callable[[str], str | None] | None


def check_kernel_shape(
    name: str,
    shape: torch.Size | tuple[int, ...],
    kernel_dims: int,
    kernel_shape: tuple[int, ...],
    what: str,
) -> None:
    """Raise :class:`PriorMismatchError` naming ``name`` unless the parameter's spatial
    kernels (its last ``kernel_dims`` sizes) have ``kernel_shape``; ``what`` names the prior."""
    shape = tuple(shape)
    trailing = shape[len(shape) - kernel_dims :] if kernel_dims else ()
    if trailing != tuple(kernel_shape):
        raise PriorMismatchError(
            f"{what} for {name!r}: the prior models {tuple(kernel_shape)} kernels, "
            f"the parameter has shape {shape}"
            + (" (a dense weight has no spatial kernels)" if kernel_dims == 0 else "")
        )


def layer_groups_config(layer_groups: LayerGroups) -> dict[str, str]:
    """``layer_groups`` as a plain dict for a prior file ({} for "the only group").

    Raises ``ValueError`` for a function, which no file can hold."""
    if callable(layer_groups):
        raise ValueError("a prior with a function as layer_groups cannot be saved; use a mapping")
    return dict(layer_groups or {})


class KernelGroups:
    """Mixin of the priors that hold one kernel distribution per group of layers.

    The prior class (a :class:`~dwp.priors.Prior` subclass listing this mixin first)
    provides ``layer_groups`` (:data:`LayerGroups`), :attr:`groups`,
    :meth:`kernel_shape_of` and :meth:`for_group`; the mixin binds the template to a layer
    (:meth:`for_site`: group, then kernel shape, each error naming the layer) and answers
    :meth:`kl` and :meth:`sample` for a template through its site priors.
    """

    #: How errors name the prior ("deep weight prior").
    what: str = "kernel prior"
    layer_groups: LayerGroups

    @property
    def groups(self) -> list[str]:
        raise NotImplementedError

    def kernel_shape_of(self, group: str) -> tuple[int, ...]:
        """The shape of one kernel slice of ``group``, e.g. ``(3, 3, 3)``."""
        raise NotImplementedError

    def for_group(self, group: str) -> Prior:
        """The site prior of every layer of ``group`` (what :meth:`for_site` returns)."""
        raise NotImplementedError

    def group_of(self, layer: str) -> str:
        """The group of ``layer``; :class:`PriorMismatchError` naming it if there is none.

        A mapping is looked up by exact name first, then by its keys as glob patterns in
        order; a function is called; without either, a prior of one group maps every
        layer to it.
        """
        group = None
        if callable(self.layer_groups):
            group = self.layer_groups(layer)
        elif self.layer_groups is not None:
            group = self.layer_groups.get(layer)
            if group is None:
                group = next(
                    (g for p, g in self.layer_groups.items() if fnmatch.fnmatchcase(layer, p)), None
                )
        elif len(self.groups) == 1:
            group = self.groups[0]
        if group is None or group not in self.groups:
            raise PriorMismatchError(
                f"{self.what}: layer {layer!r} has no group"
                + (f" ({group!r} is not one)" if group is not None else "")
                + f"; the prior's groups are {self.groups}. Pass layer_groups= or exclude the layer."
            )
        return group

    def for_site(self, name: str, weight: Tensor, kernel_dims: int) -> Prior:
        """The site prior of the layer owning ``name`` (``"<layer>.weight"``): its group's,
        after checking that the weight's kernels have the group's shape."""
        group = self.group_of(name.removesuffix(".weight"))
        check_kernel_shape(name, weight.shape, kernel_dims, self.kernel_shape_of(group), self.what)
        return self.for_group(group)

    def kl(self, posterior: MeanFieldNormal) -> Tensor:
        """KL (or its bound) for a posterior whose ``name`` identifies its layer and group."""
        return self.for_site(posterior.name, posterior.loc, posterior.kernel_dims).kl(posterior)

    def sample(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """A weight of ``shape`` from a one-group prior (several groups: use ``for_site``)."""
        if len(self.groups) != 1:
            raise ValueError(
                "sample() of a multi-group prior needs a layer: use prior.for_site(...)"
            )
        return self.for_group(self.groups[0]).sample(shape)


# A group may be named after a layer ("down1.conv_1.conv", from ``group_by="layer"``), but
# torch refuses "." in a submodule's or a parameter's attribute name: the containers below
# keep the group's own name as the key and store it under an escaped attribute name, so a
# prior's state_dict keys stay unambiguous ("%" escaped first, so the escape is invertible).
_ESCAPES = (("%", "%25"), (".", "%2E"))


def _escape(name: str) -> str:
    for raw, escaped in _ESCAPES:
        name = name.replace(raw, escaped)
    return name


def _unescape(attribute: str) -> str:
    for raw, escaped in reversed(_ESCAPES):
        attribute = attribute.replace(escaped, raw)
    return attribute


class GroupModules(nn.ModuleDict):
    """An :class:`torch.nn.ModuleDict` whose keys are group names, dots allowed.

    Keys, iteration and indexing use the group names; the submodules' attribute names (and
    so the ``state_dict`` keys) escape ``.`` as ``%2E`` and ``%`` as ``%25``; names without
    either are stored unchanged, so files written before this escape load as they are.
    """

    def __getitem__(self, key: str) -> nn.Module:
        return super().__getitem__(_escape(key))

    def __setitem__(self, key: str, module: nn.Module) -> None:
        super().__setitem__(_escape(key), module)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(_escape(key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(_escape(key))

    def __iter__(self) -> Iterator[str]:
        return (_unescape(k) for k in super().__iter__())

    def keys(self) -> list[str]:  # type: ignore[override]
        return [_unescape(k) for k in super().keys()]

    def items(self) -> list[tuple[str, nn.Module]]:  # type: ignore[override]
        return [(_unescape(k), m) for k, m in super().items()]

    def pop(self, key: str) -> nn.Module:
        return super().pop(_escape(key))


class GroupParameters(nn.ParameterDict):
    """An :class:`torch.nn.ParameterDict` whose keys are group names, dots allowed (stored
    under escaped attribute names, as in :class:`GroupModules`)."""

    def _key_to_attr(self, key: str) -> str:
        return _escape(super()._key_to_attr(key))

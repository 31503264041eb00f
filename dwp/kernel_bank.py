"""The kernel bank: spatial kernel slices of source networks, with provenance and groups.

:func:`dwp.collect_kernels` fills a :class:`KernelBank`; a deep weight prior is fitted on
it, one kernel VAE per group.  The bank is immutable, validated on construction, and saved
as one versioned file (:data:`BANK_FILE`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .io import FileFormat, LibraryFileError, check_plain

__all__ = ["BANK_FILE", "KernelBank", "KernelBankError"]


class KernelBankError(LibraryFileError):
    """A kernel bank (in memory or in a file) is malformed; the message says what is wrong."""


#: The kernel bank's file: version 1 holds these keys besides the header.
BANK_FILE = FileFormat(
    tag="dwp.KernelBank",
    version=1,
    keys=(
        "kernels",
        "group",
        "source",
        "layer",
        "group_names",
        "source_names",
        "layer_names",
        "layer_groups",
        "metadata",
    ),
    error=KernelBankError,
    what="dwp kernel bank",
)


@dataclass(frozen=True, eq=False, repr=False)
class KernelBank:
    """Spatial kernel slices of source networks, with provenance and prior groups.

    Attributes
    ----------
    kernels
        ``(N, *kernel_shape)`` float32 CPU tensor, e.g. ``(N, 3, 3, 3)``.
    group, source, layer
        ``(N,)`` int64 indices into ``group_names``, ``source_names`` and ``layer_names``:
        kernel ``n`` is a slice of layer ``layer_names[layer[n]]`` of source
        ``source_names[source[n]]`` and belongs to group ``group_names[group[n]]``.
    group_names, source_names, layer_names
        Unique names, in order of first appearance (groups of ``"resolution"``: execution
        order).
    layer_groups
        Layer name -> group name for every layer; a prior uses it to map the layers of a
        target network to its groups.  ``group`` always agrees with it.
    metadata
        How the bank was made: ``group_by``, ``kernel_shape``, ``min_norm``, and per group
        ``total`` (kernels collected) and ``kept`` (after pruning); ``resolutions`` (group ->
        input spatial shape) for ``group_by="resolution"``.  Only plain Python values (it is
        stored in the file).

    Construction checks all of this and raises :class:`KernelBankError` when something
    does not fit.  Banks are immutable; :meth:`prune` returns a new one.
    """

    kernels: Tensor
    group: Tensor
    source: Tensor
    layer: Tensor
    group_names: list[str]
    source_names: list[str]
    layer_names: list[str]
    layer_groups: dict[str, str]
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # normalise containers (a tuple of names loads the same as a list) and move tensors
        # to detached CPU copies, then check everything; load() relies on this validation
        for name in ("kernels", "group", "source", "layer"):
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise KernelBankError(f"{name} must be a tensor, got {type(value).__name__}")
            object.__setattr__(self, name, value.detach().cpu().contiguous())
        for name in ("group_names", "source_names", "layer_names"):
            object.__setattr__(self, name, _names(getattr(self, name), name))
        if not isinstance(self.layer_groups, Mapping):
            raise KernelBankError(
                f"layer_groups must be a dict, got {type(self.layer_groups).__name__}"
            )
        object.__setattr__(self, "layer_groups", dict(self.layer_groups))
        if not isinstance(self.metadata, Mapping):
            raise KernelBankError(f"metadata must be a dict, got {type(self.metadata).__name__}")
        object.__setattr__(self, "metadata", dict(self.metadata))
        self._validate()

    def _validate(self) -> None:
        kernels = self.kernels
        if kernels.dtype != torch.float32:
            raise KernelBankError(f"kernels must be float32, got {kernels.dtype}")
        if not 2 <= kernels.dim() <= 4:
            raise KernelBankError(
                f"kernels must be (N, *kernel_shape) with 1-3 kernel dims, got shape "
                f"{tuple(kernels.shape)}"
            )
        if not torch.isfinite(kernels).all():
            raise KernelBankError("kernels hold NaN or infinite values")
        n = kernels.shape[0]
        for name, names in (
            ("group", self.group_names),
            ("source", self.source_names),
            ("layer", self.layer_names),
        ):
            index = getattr(self, name)
            if index.dtype != torch.int64 or index.dim() != 1:
                raise KernelBankError(
                    f"{name} must be a 1-d int64 tensor, got {index.dtype} of shape "
                    f"{tuple(index.shape)}"
                )
            if index.shape[0] != n:
                raise KernelBankError(f"{name} has {index.shape[0]} entries for {n} kernels")
            if n and (index.min() < 0 or index.max() >= len(names)):
                raise KernelBankError(
                    f"{name} indices must lie in [0, {len(names)}) ({len(names)} {name} "
                    f"names), got range [{index.min().item()}, {index.max().item()}]"
                )
        if set(self.layer_groups) != set(self.layer_names):
            missing = sorted(set(self.layer_names) - set(self.layer_groups))
            extra = sorted(set(self.layer_groups) - set(self.layer_names))
            raise KernelBankError(
                f"layer_groups must map exactly the layer names; missing {missing}, unknown {extra}"
            )
        unknown = {
            layer: group
            for layer, group in self.layer_groups.items()
            if not isinstance(group, str) or group not in self.group_names
        }
        if unknown:
            raise KernelBankError(
                f"layer_groups refer to unknown groups {unknown}; groups: {self.group_names}"
            )
        # the per-kernel group must be the group of the kernel's layer
        layer_to_group = torch.tensor(
            [self.group_names.index(self.layer_groups[name]) for name in self.layer_names],
            dtype=torch.int64,
        )
        if n and not torch.equal(layer_to_group[self.layer], self.group):
            bad = int((layer_to_group[self.layer] != self.group).nonzero()[0, 0])
            raise KernelBankError(
                f"kernel {bad} of layer {self.layer_names[self.layer[bad]]!r} is in group "
                f"{self.group_names[self.group[bad]]!r}, but layer_groups puts that layer in "
                f"{self.layer_groups[self.layer_names[self.layer[bad]]]!r}"
            )

    # -- views ----------------------------------------------------------------------------
    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The spatial shape of one kernel, e.g. ``(3, 3, 3)``."""
        return tuple(self.kernels.shape[1:])

    def __len__(self) -> int:
        return self.kernels.shape[0]

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.kernel_shape))
        return (
            f"KernelBank({len(self)} kernels of {shape}, {len(self.group_names)} groups, "
            f"{len(self.source_names)} sources, {len(self.layer_names)} layers)"
        )

    def _group_index(self, group: str) -> int:
        try:
            return self.group_names.index(group)
        except ValueError:
            raise KeyError(
                f"no kernel group {group!r} in this bank; known groups: {self.group_names}"
            ) from None

    def select(self, group: str) -> Tensor:
        """The kernels of one group, ``(n_group, *kernel_shape)``.

        Raises ``KeyError`` naming the group and the known groups when there is none.
        """
        return self.kernels[self.group == self._group_index(group)]

    def groups(self) -> dict[str, Tensor]:
        """Group name -> its kernels ``(n_group, *kernel_shape)``, in ``group_names`` order."""
        return {name: self.select(name) for name in self.group_names}

    def norms(self) -> Tensor:
        """The L2 norm of every kernel, ``(N,)``."""
        return self.kernels.flatten(1).norm(dim=1)

    def _counts(self) -> dict[str, int]:
        counts = torch.bincount(self.group, minlength=len(self.group_names))
        return {name: int(c) for name, c in zip(self.group_names, counts.tolist(), strict=True)}

    # -- pruning --------------------------------------------------------------------------
    def prune(self, min_norm: float) -> KernelBank:
        """A bank without the near-dead kernels: those whose L2 norm is below ``min_norm``.

        A VAE fitted on every slice, dead ones included, mostly learns "small kernel": the
        original DWP kernel sets kept the 7x7 slices of norm >= ~0.39, about 9 % of them.
        ``metadata`` records ``min_norm`` and, per group, ``total`` (before any pruning) and
        ``kept``.  Names (and so ``layer_groups``) are kept even where no kernel is left.
        """
        min_norm = float(min_norm)
        if not math.isfinite(min_norm) or min_norm < 0:
            raise ValueError(f"min_norm must be a finite number >= 0, got {min_norm}")
        keep = self.norms() >= min_norm
        metadata = dict(self.metadata)
        metadata.setdefault("total", self._counts())  # pruning twice keeps the first total
        previous = metadata.get("min_norm")
        metadata["min_norm"] = min_norm if previous is None else max(previous, min_norm)
        pruned = KernelBank(
            kernels=self.kernels[keep],
            group=self.group[keep],
            source=self.source[keep],
            layer=self.layer[keep],
            group_names=list(self.group_names),
            source_names=list(self.source_names),
            layer_names=list(self.layer_names),
            layer_groups=dict(self.layer_groups),
            metadata=metadata,
        )
        pruned.metadata["kept"] = pruned._counts()
        return pruned

    # -- reporting ------------------------------------------------------------------------
    def summary(self) -> str:
        """A Markdown table: group, number of layers, kernels (kept of total), mean norm."""
        counts = self._counts()
        totals = self.metadata.get("total") or {}
        norms = self.norms()
        rows = ["| group | layers | kernels | mean norm |", "|---|---|---|---|"]
        for index, name in enumerate(self.group_names):
            n_layers = sum(1 for g in self.layer_groups.values() if g == name)
            kernels = f"{counts[name]:,}"
            total = totals.get(name)
            if total is not None and total != counts[name]:
                kernels += f" of {total:,}"
            in_group = norms[self.group == index]
            mean = f"{in_group.mean().item():.4g}" if len(in_group) else "-"
            rows.append(f"| {name} | {n_layers} | {kernels} | {mean} |")
        return "\n".join(rows)

    # -- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the bank to one file, atomically.

        The file is written next to ``path`` under a temporary name and moved over ``path``
        with ``os.replace``, so readers never see half a file.  It stores a format version
        and the dwp version; read it back with :meth:`load`.
        """
        check_plain(self.metadata, "metadata")
        BANK_FILE.save(
            {
                "kernels": self.kernels,
                "group": self.group,
                "source": self.source,
                "layer": self.layer,
                "group_names": list(self.group_names),
                "source_names": list(self.source_names),
                "layer_names": list(self.layer_names),
                "layer_groups": dict(self.layer_groups),
                "metadata": dict(self.metadata),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> KernelBank:
        """Read a bank written by :meth:`save` (``torch.load(weights_only=True)``).

        Raises
        ------
        FileNotFoundError
            No such file.
        KernelBankError
            The file is truncated or corrupt (its checksum does not match: also a
            :class:`dwp.io.CorruptFileError`), holds NaN or infinite values, holds
            something else than a kernel bank,
            comes from a newer format, misses a key, or holds inconsistent data (dtypes,
            lengths, indices out of range, unknown groups); the message names the file.
        """
        payload = BANK_FILE.load(path)
        try:
            return cls(**{key: payload[key] for key in BANK_FILE.keys})
        except KernelBankError as exc:
            raise KernelBankError(f"{path}: invalid kernel bank: {exc}") from exc


def _names(values: Any, what: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise KernelBankError(f"{what} must be a list of strings, got {type(values).__name__}")
    names = list(values)
    if not all(isinstance(v, str) for v in names):
        raise KernelBankError(f"{what} must be a list of strings, got {names!r}")
    if len(set(names)) != len(names):
        duplicated = sorted({v for v in names if names.count(v) > 1})
        raise KernelBankError(f"{what} must be unique, repeated: {duplicated}")
    return names

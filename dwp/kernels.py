"""The kernel bank of the deep weight prior: spatial kernel slices of trained networks.

The deep weight prior (Atanov et al. 2019; Kuzina et al. 2019 for 3D MRI) fits a small VAE
to the *kernels* of networks trained on a source task.  A kernel is one spatial slice
``w[o, i]`` of a convolution weight ``w`` of shape ``(C_out, C_in / groups, *k)``: ``k``,
``k x k`` or ``k x k x k`` values (non-cubic sizes allowed).  :func:`collect_kernels`
gathers them from modules, state dicts or checkpoint files, remembers where each came
from (source, layer) and sorts them into the groups that get one prior each;
:class:`KernelBank` holds the result and is saved and loaded as one versioned file.

Grouping
--------
``"layer"``
    One group per layer (the original DWP code: one VAE per layer).
``"resolution"``
    Layers whose inputs have the same spatial resolution *consecutively in execution
    order* share a group (Kuzina et al.: "layers that take inputs of the same resolution
    share a distribution").  For a U-Net 48 -> 24 -> 12 -> 6 -> 12 -> 24 -> 48 this gives
    seven groups: the decoder is not grouped with the encoder at the same resolution, and a
    strided conv belongs to the resolution of its input.
``"all"``
    One group ``"all"``.
a callable
    ``group_by(layer_name) -> group_name``.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._io import atomic_write
from .settings import sampling

__all__ = ["KernelBank", "KernelBankError", "collect_kernels"]

#: the ``format`` tag of a saved kernel bank
_FORMAT = "dwp.KernelBank"
#: bumped when the file layout changes; :meth:`KernelBank.load` reads versions up to this
_FORMAT_VERSION = 1
_FILE_KEYS = (
    "format",
    "format_version",
    "dwp_version",
    "kernels",
    "group",
    "source",
    "layer",
    "group_names",
    "source_names",
    "layer_names",
    "layer_groups",
    "metadata",
)
#: the conv classes whose ``weight`` is (C_out, C_in / groups, *k); dwp's Bayesian convs
#: subclass them, transposed convs (weight (C_in, C_out / groups, *k)) do not
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

Source = nn.Module | Mapping[str, Tensor] | str | os.PathLike
GroupBy = str | Callable[[str], str]
Include = str | Iterable[str] | Callable[[str], bool] | None


class KernelBankError(ValueError):
    """A kernel bank (in memory or in a file) is malformed; the message says what is wrong."""


# -- the bank -----------------------------------------------------------------------------
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
        from . import __version__  # lazily: dwp/__init__ imports this module

        _check_plain(self.metadata, "metadata")
        payload = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "dwp_version": __version__,
            "kernels": self.kernels,
            "group": self.group,
            "source": self.source,
            "layer": self.layer,
            "group_names": list(self.group_names),
            "source_names": list(self.source_names),
            "layer_names": list(self.layer_names),
            "layer_groups": dict(self.layer_groups),
            "metadata": dict(self.metadata),
        }
        with atomic_write(path) as handle:
            torch.save(payload, handle)

    @classmethod
    def load(cls, path: str | os.PathLike) -> KernelBank:
        """Read a bank written by :meth:`save` (``torch.load(weights_only=True)``).

        Raises
        ------
        FileNotFoundError
            No such file.
        KernelBankError
            The file is truncated or corrupt, holds something else than a kernel bank,
            comes from a newer format, misses a key, or holds inconsistent data (dtypes,
            lengths, indices out of range, unknown groups); the message names the file.
        """
        path = Path(path)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except Exception as exc:  # torch raises several types for damaged files
            raise KernelBankError(
                f"{path}: cannot read the file as a torch file (truncated or corrupt?): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(payload, Mapping) or payload.get("format") != _FORMAT:
            what = (
                f"a dict with keys {sorted(map(str, payload))[:10]}"
                if isinstance(payload, Mapping)
                else f"a {type(payload).__name__}"
            )
            raise KernelBankError(f"{path}: not a dwp kernel bank file (it holds {what})")
        version = payload.get("format_version")
        if not isinstance(version, int) or not 1 <= version <= _FORMAT_VERSION:
            raise KernelBankError(
                f"{path}: kernel bank format version {version!r} is not readable by this dwp "
                f"(reads 1 to {_FORMAT_VERSION}; written by dwp "
                f"{payload.get('dwp_version', '?')})"
            )
        missing = [key for key in _FILE_KEYS if key not in payload]
        if missing:
            raise KernelBankError(f"{path}: kernel bank file misses keys {missing}")
        try:
            return cls(**{key: payload[key] for key in _FILE_KEYS[3:]})
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


def _check_plain(value: Any, where: str) -> None:
    """Raise ``TypeError`` unless ``value`` loads under ``torch.load(weights_only=True)``."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, f"{where} key")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} holds a {type(value).__name__}; a kernel bank file stores only plain "
        f"Python values (str, int, float, bool, None, lists, tuples, dicts)"
    )


# -- reading sources ----------------------------------------------------------------------
def _as_sources(sources: Source | Iterable[Source]) -> list[Source]:
    if isinstance(sources, (nn.Module, Mapping, str, os.PathLike)):
        return [sources]
    return list(sources)


def _storage_key(tensor: Tensor) -> tuple | None:
    """Identity of a tensor's memory: tied weights (one tensor under two names) share it."""
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return None
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
    )


def _module_convs(module: nn.Module) -> dict[str, Tensor]:
    """Conv layer name -> weight, in module order; tied weights once, at their first name."""
    layers: dict[str, Tensor] = {}
    seen: set = set()
    for name, child in module.named_modules():
        if not isinstance(child, _CONV_TYPES):
            continue
        weight = child.weight
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"conv layer {name!r} is lazy and not initialised yet; run one forward pass "
                f"before collecting its kernels"
            )
        key = _storage_key(weight)
        if key is not None and key in seen:
            continue
        seen.add(key)
        layers[name] = weight
    return layers


def _state_dict_convs(state: Mapping[str, Any], structure: nn.Module | None) -> dict[str, Tensor]:
    """Conv layer name -> weight of a state dict: ``.weight`` keys of 3, 4 or 5 dims.

    A state dict does not tell a conv weight from a transposed conv's; where a structure
    module (template) names the layer, only its conv layers count.
    """
    kinds = dict(structure.named_modules()) if structure is not None else {}
    layers: dict[str, Tensor] = {}
    seen: set = set()
    for key, value in state.items():
        if not isinstance(value, Tensor) or value.dim() not in (3, 4, 5):
            continue
        if key == "weight":
            name = ""
        elif key.endswith(".weight"):
            name = key[: -len(".weight")]
        else:
            continue
        if name in kinds and not isinstance(kinds[name], _CONV_TYPES):
            continue
        storage = _storage_key(value)
        if storage is not None and storage in seen:
            continue
        seen.add(storage)
        layers[name] = value
    return layers


def _load_checkpoint(path: Path) -> Mapping[str, Any]:
    """The state dict in a checkpoint file: the file's dict, or its "state_dict"/"model"."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as exc:
        raise ValueError(
            f"{path}: cannot read the checkpoint with torch.load(weights_only=True) "
            f"(save a state dict, not a pickled module): {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                return obj[key]
        if any(isinstance(v, Tensor) for v in obj.values()):
            return obj
    what = (
        f"a dict with keys {sorted(map(str, obj))[:10]}"
        if isinstance(obj, Mapping)
        else f"a {type(obj).__name__}"
    )
    raise ValueError(
        f"{path}: holds neither a state dict nor a dict with a 'state_dict' or 'model' key "
        f"holding one (it holds {what})"
    )


def _default_source_names(sources: list[Source]) -> list[str]:
    names = [
        Path(s).name if isinstance(s, (str, os.PathLike)) else f"source{i}"
        for i, s in enumerate(sources)
    ]
    # checkpoints of several runs often share a file name (run1/model.pt, run2/model.pt)
    if len(set(names)) != len(names):
        names = [
            str(s) if isinstance(s, (str, os.PathLike)) else name
            for s, name in zip(sources, names, strict=True)
        ]
    if len(set(names)) != len(names):
        names = [f"{name}#{i}" for i, name in enumerate(names)]
    return names


# -- choosing layers ----------------------------------------------------------------------
def _layer_filter(include: Include) -> tuple[Callable[[str], bool], list[str], set[str]]:
    """A predicate for ``include``, its patterns (to report unused ones), and exact names."""
    if include is None:
        return (lambda name: True), [], set()
    if callable(include):
        return include, [], set()
    patterns = [include] if isinstance(include, str) else list(include)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"include must be name patterns or a predicate, got {include!r}")
    exact = {p for p in patterns if not any(c in p for c in "*?[")}
    return (lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)), patterns, exact


def _select_layers(
    per_source: list[dict[str, Tensor]],
    source_names: list[str],
    include: Include,
    kernel_shape: tuple[int, ...] | None,
) -> tuple[list[str], tuple[int, ...]]:
    """The chosen layer names (order of first appearance) and the common kernel shape."""
    included, patterns, exact = _layer_filter(include)
    all_names = list(dict.fromkeys(name for layers in per_source for name in layers))
    unused = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in all_names)]
    if unused:
        raise ValueError(
            f"include patterns {unused} match no conv layer of the sources; conv layers: "
            f"{all_names}"
        )

    shapes: dict[str, dict[str, tuple[int, ...]]] = {}  # layer -> source -> kernel shape
    for source_name, layers in zip(source_names, per_source, strict=True):
        for name, weight in layers.items():
            if not included(name):
                continue
            shape = tuple(weight.shape[2:])
            # a 1x1(x1) conv mixes channels and has no spatial kernel: only when asked for
            pointwise = all(s == 1 for s in shape)
            if pointwise and name not in exact and kernel_shape != shape:
                continue
            shapes.setdefault(name, {})[source_name] = shape
    for name, by_source in shapes.items():
        if len(set(by_source.values())) > 1:
            raise ValueError(
                f"layer {name!r} has different kernel shapes in different sources "
                f"({by_source}); the sources must share one architecture"
            )
    layer_shapes = {name: next(iter(s.values())) for name, s in shapes.items()}
    if kernel_shape is None:
        if not layer_shapes:
            raise ValueError(
                f"no conv layer with a spatial kernel in the sources {source_names}"
                + (f" matching include={include!r}" if include is not None else "")
            )
        kernel_shape = next(iter(layer_shapes.values()))
        others = {n: s for n, s in layer_shapes.items() if s != kernel_shape}
        if others:
            first = next(iter(layer_shapes))
            raise ValueError(
                f"conv layers of another kernel shape than {kernel_shape} (that of the first "
                f"layer found, {first!r}): {others}; choose one shape with kernel_shape= or "
                f"leave layers out with include="
            )
    chosen = [n for n, s in layer_shapes.items() if s == kernel_shape]
    if not chosen:
        raise ValueError(
            f"no conv layer with kernel shape {kernel_shape} in the sources {source_names}; "
            f"kernel shapes found: {sorted(set(layer_shapes.values()))}"
        )
    return chosen, kernel_shape


# -- grouping -----------------------------------------------------------------------------
def _resolution_groups(
    module: nn.Module, layer_names: list[str], kernel_shape: tuple[int, ...], example_input: Any
) -> tuple[dict[str, str], dict[str, list[int]]]:
    """Layer -> group by input resolution, from one forward pass of ``module``.

    Groups are maximal runs of equal input spatial shape in the order in which the layers
    are *first* called, so an encoder and a decoder at the same resolution differ.
    """
    convs = {
        name: m
        for name, m in module.named_modules(remove_duplicate=False)
        if isinstance(m, _CONV_TYPES)
    }
    missing = [name for name in layer_names if name not in convs]
    if missing:
        raise ValueError(
            f"layers {missing} are not conv layers of the {type(module).__name__} run for "
            f"group_by='resolution'; its conv layers: {list(convs)}"
        )
    wrong = {
        name: tuple(convs[name].weight.shape[2:])
        for name in layer_names
        if tuple(convs[name].weight.shape[2:]) != kernel_shape
    }
    if wrong:
        raise ValueError(
            f"layers of the {type(module).__name__} run for group_by='resolution' have other "
            f"kernel shapes than the sources' {kernel_shape}: {wrong}"
        )

    first_shape: dict[int, tuple[int, ...]] = {}  # id(module) -> input spatial shape
    call_order: list[int] = []

    def record(conv: nn.Module, args: tuple, kwargs: dict) -> None:
        if id(conv) in first_shape:  # a shared conv keeps the group of its first call
            return
        x = args[0] if args else kwargs["input"]
        first_shape[id(conv)] = tuple(x.shape[-len(kernel_shape) :])
        call_order.append(id(conv))

    targets = {id(convs[name]): convs[name] for name in layer_names}
    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in targets.values()]
    training = [(m, m.training) for m in module.modules()]
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    device = next((p.device for p in module.parameters()), None)
    if device is not None:
        inputs = tuple(x.to(device) if isinstance(x, Tensor) else x for x in inputs)
    try:
        # eval: no BatchNorm statistics updates, no dropout; posterior means: no random
        # numbers drawn even inside a ``dwp.sampling()`` block
        module.eval()
        with torch.no_grad(), sampling(False):
            module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in training:
            m.training = mode

    not_run = [name for name in layer_names if id(convs[name]) not in first_shape]
    if not_run:
        raise ValueError(
            f"layers {not_run} did not run in the forward pass on example_input, so their "
            f"input resolution is unknown; leave them out with include="
        )
    group_of: dict[int, str] = {}
    resolutions: dict[str, list[int]] = {}
    previous = None
    for conv_id in call_order:
        shape = first_shape[conv_id]
        if shape != previous:
            name = f"g{len(resolutions)}_{'x'.join(map(str, shape))}"
            resolutions[name] = list(shape)
            previous = shape
        group_of[conv_id] = name
    return {layer: group_of[id(convs[layer])] for layer in layer_names}, resolutions


def _group_layers(
    layer_names: list[str], group_by: GroupBy
) -> tuple[dict[str, str], list[str], str]:
    """Layer -> group for the name-based groupings, the group order and a description."""
    if group_by == "layer":
        layer_groups = {name: name for name in layer_names}
        described = "layer"
    elif group_by == "all":
        layer_groups = {name: "all" for name in layer_names}
        described = "all"
    elif callable(group_by):
        layer_groups = {}
        for name in layer_names:
            group = group_by(name)
            if not isinstance(group, str):
                raise TypeError(
                    f"group_by returned {group!r} for layer {name!r}; it must return a str"
                )
            layer_groups[name] = group
        described = f"callable:{getattr(group_by, '__qualname__', repr(group_by))}"
    else:
        raise ValueError(
            f"group_by must be 'layer', 'resolution', 'all' or a callable, got {group_by!r}"
        )
    return layer_groups, list(dict.fromkeys(layer_groups.values())), described


# -- the entry point ----------------------------------------------------------------------
def collect_kernels(
    sources: Source | Iterable[Source],
    group_by: GroupBy = "layer",
    *,
    include: Include = None,
    kernel_shape: Sequence[int] | None = None,
    example_input: Tensor | tuple | None = None,
    template: nn.Module | None = None,
    source_names: Sequence[str] | None = None,
    min_norm: float | None = None,
) -> KernelBank:
    """Gather the spatial kernel slices of conv layers of trained source networks.

    Every chosen conv weight ``w`` of shape ``(C_out, C_in / groups, *k)`` contributes
    ``C_out * C_in / groups`` kernels ``w[o, i]`` of shape ``k``, in that order; kernels are
    ordered by source, then layer, then slice.

    Parameters
    ----------
    sources
        One source or a sequence of them, each an ``nn.Module``, a state dict, or the path
        of a checkpoint saved with ``torch.save`` holding a state dict or a dict whose
        ``"state_dict"`` or ``"model"`` entry is one.  In a module the conv layers are the
        ``nn.Conv1d/2d/3d`` instances (dwp's Bayesian convs included: their ``weight`` is the
        posterior mean); transposed convs are left out.  In a state dict they are the
        ``<layer>.weight`` entries of 3, 4 or 5 dims (a transposed conv cannot be told apart
        there unless ``template`` or a module source names the layer).  Weights shared by
        several layers count once.  Sources may lack layers (fewer kernels); a layer with
        another kernel shape than in another source is an error.
    group_by
        ``"layer"`` (one group per layer), ``"resolution"`` (see the module docstring;
        needs ``example_input``), ``"all"`` or ``group_by(layer_name) -> group_name``.
    include
        Which layers: ``None`` for every conv with a kernel larger than 1 in some spatial
        dim, glob patterns on layer names (``"encoder.*"``; a pattern matching no layer is
        an error) or a predicate ``(layer_name) -> bool``.  1x1(x1) convs are taken only
        when named exactly in ``include`` or when ``kernel_shape`` asks for them.
    kernel_shape
        Keep only layers with this kernel shape, e.g. ``(3, 3, 3)``.  Default: the shape of
        the first layer found, and a chosen layer of another shape is an error naming it.
    example_input
        The input (or a tuple of inputs) of one forward pass, for ``"resolution"``.
    template
        The network run for ``"resolution"`` (only its structure matters; nothing is loaded
        into it) when no source is a module; default: the first module among the sources.
        It also tells conv weights of state dicts from transposed convs.
    source_names
        Names for provenance; default ``"source{i}"``, or the file name for paths (the path
        when file names repeat).
    min_norm
        Drop kernels of L2 norm below this (see :meth:`KernelBank.prune`).

    Returns
    -------
    KernelBank
        Detached CPU float32 kernels with provenance and groups.  The sources are left
        unchanged (a module's train/eval state is restored after the forward pass).
    """
    sources = _as_sources(sources)
    if not sources:
        raise ValueError("collect_kernels needs at least one source")
    if source_names is None:
        names = _default_source_names(sources)
    else:
        names = [str(n) for n in source_names]
        if len(names) != len(sources):
            raise ValueError(f"{len(names)} source_names for {len(sources)} sources")
        if len(set(names)) != len(names):
            raise ValueError(f"source_names must be unique, got {names}")
    if kernel_shape is not None:
        kernel_shape = tuple(int(k) for k in kernel_shape)
    resolution = isinstance(group_by, str) and group_by == "resolution"
    if isinstance(group_by, str) and group_by not in ("layer", "resolution", "all"):
        raise ValueError(
            f"group_by must be 'layer', 'resolution', 'all' or a callable, got {group_by!r}"
        )
    if resolution and example_input is None:
        raise ValueError("group_by='resolution' needs example_input for one forward pass")

    structure = template
    if structure is None:
        structure = next((s for s in sources if isinstance(s, nn.Module)), None)
    if resolution and structure is None:
        raise ValueError(
            "group_by='resolution' needs a network to run: pass template= (an nn.Module of "
            "the sources' architecture) when the sources are state dicts or checkpoints"
        )

    per_source: list[dict[str, Tensor]] = []
    for source in sources:
        if isinstance(source, nn.Module):
            per_source.append(_module_convs(source))
        elif isinstance(source, Mapping):
            per_source.append(_state_dict_convs(source, structure))
        elif isinstance(source, (str, os.PathLike)):
            per_source.append(_state_dict_convs(_load_checkpoint(Path(source)), structure))
        else:
            raise TypeError(
                f"a source must be an nn.Module, a state dict or a checkpoint path, got "
                f"{type(source).__name__}"
            )

    layer_names, shape = _select_layers(per_source, names, include, kernel_shape)
    if resolution:
        layer_groups, resolutions = _resolution_groups(structure, layer_names, shape, example_input)
        group_names = list(resolutions)
        metadata: dict[str, Any] = {"group_by": "resolution", "resolutions": resolutions}
    else:
        layer_groups, group_names, described = _group_layers(layer_names, group_by)
        metadata = {"group_by": described}
    metadata.update(kernel_shape=list(shape), min_norm=None)

    layer_index = {name: i for i, name in enumerate(layer_names)}
    group_index = {name: i for i, name in enumerate(group_names)}
    kernels, groups, source_ids, layer_ids = [], [], [], []
    for s, layers in enumerate(per_source):
        for name, weight in layers.items():
            if name not in layer_index:
                continue
            slices = weight.detach().to("cpu", torch.float32).reshape(-1, *shape)
            n = slices.shape[0]
            kernels.append(slices)
            groups.append(torch.full((n,), group_index[layer_groups[name]], dtype=torch.int64))
            source_ids.append(torch.full((n,), s, dtype=torch.int64))
            layer_ids.append(torch.full((n,), layer_index[name], dtype=torch.int64))

    bank = KernelBank(
        # cat copies, so the bank never aliases a source's parameters
        kernels=torch.cat(kernels),
        group=torch.cat(groups),
        source=torch.cat(source_ids),
        layer=torch.cat(layer_ids),
        group_names=group_names,
        source_names=names,
        layer_names=layer_names,
        layer_groups=layer_groups,
        metadata=metadata,
    )
    counts = bank._counts()
    bank.metadata.update(total=counts, kept=dict(counts))
    return bank if min_norm is None else bank.prune(min_norm)

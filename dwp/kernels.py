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

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .controls import sampling
from .io import LibraryFileError, describe_payload, load_torch_file
from .kernel_bank import KernelBank, KernelBankError
from .select import LayerSelector, model_layers

__all__ = ["KernelBank", "KernelBankError", "collect_kernels"]

#: the conv classes whose ``weight`` is (C_out, C_in / groups, *k); dwp's Bayesian convs
#: subclass them, transposed convs (weight (C_in, C_out / groups, *k)) do not
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

Source = nn.Module | Mapping[str, Tensor] | str | os.PathLike
GroupBy = str | Callable[[str], str]
#: glob patterns on layer names or a predicate ``(layer_name) -> bool`` (a state dict has
#: names, no modules: see :class:`dwp.select.LayerSelector`)
Include = str | Iterable[str] | Callable[[str], bool] | None


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


def _first_of_each_storage(weights: Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
    """Name -> weight, in order; a weight tied to an earlier one (same memory) is dropped."""
    layers: dict[str, Tensor] = {}
    seen: set = set()
    for name, weight in weights:
        key = _storage_key(weight)
        if key is not None and key in seen:
            continue
        seen.add(key)
        layers[name] = weight
    return layers


def _module_convs(module: nn.Module) -> dict[str, Tensor]:
    """Conv layer name -> weight, in module order; tied weights once, at their first name."""
    weights = []
    for name, child in model_layers(module):  # a prior's own convs are not the model's
        if not isinstance(child, _CONV_TYPES):
            continue
        if isinstance(child.weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"conv layer {name!r} is lazy and not initialised yet; run one forward pass "
                f"before collecting its kernels"
            )
        weights.append((name, child.weight))
    return _first_of_each_storage(weights)


def _state_dict_convs(state: Mapping[str, Any], structure: nn.Module | None) -> dict[str, Tensor]:
    """Conv layer name -> weight of a state dict: ``.weight`` keys of 3, 4 or 5 dims.

    A state dict does not tell a conv weight from a transposed conv's; where a structure
    module (template) names the layer, only its conv layers count.
    """
    kinds = dict(model_layers(structure)) if structure is not None else {}
    weights = []
    for key, value in state.items():
        if not isinstance(value, Tensor) or value.dim() not in (3, 4, 5):
            continue
        if key != "weight" and not key.endswith(".weight"):
            continue
        name = key[: -len(".weight")] if key != "weight" else ""
        if name in kinds and not isinstance(kinds[name], _CONV_TYPES):
            continue
        weights.append((name, value))
    return _first_of_each_storage(weights)


def _load_checkpoint(path: Path) -> Mapping[str, Any]:
    """The state dict in a checkpoint file: the file's dict, or its "state_dict"/"model"."""
    obj = load_torch_file(path, what="checkpoint", hint="save a state dict, not a pickled module")
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                return obj[key]
        if any(isinstance(v, Tensor) for v in obj.values()):
            return obj
    raise LibraryFileError(
        f"{path}: holds neither a state dict nor a dict with a 'state_dict' or 'model' key "
        f"holding one (it holds {describe_payload(obj)})"
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
def _select_layers(
    per_source: list[dict[str, Tensor]],
    source_names: list[str],
    include: Include,
    kernel_shape: tuple[int, ...] | None,
) -> tuple[list[str], tuple[int, ...]]:
    """The chosen layer names (order of first appearance) and the common kernel shape."""
    included = LayerSelector(include, "include", takes_module=False)
    exact = included.exact_names
    all_names = list(dict.fromkeys(name for layers in per_source for name in layers))
    unused = included.unused_patterns(all_names)
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
        for name, m in model_layers(module, remove_duplicate=False)
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

"""3D BagNets (Brendel & Bethge 2019; 3D and regression by Pawlowski & Glocker 2019).

A BagNet is a ResNet-50 whose receptive field is capped by replacing 3x3 convolutions with
1x1 ones: a linear head applied at every location gives a *local* prediction map, and the
global prediction is the spatial mean of that map (average and linear head commute).

Layout (ResNet-50 bottlenecks ``[3, 4, 6, 3]``, strides ``[2, 2, 2, 1]``, no max-pool, a
1x1 then a 3x3 stem).  ``kernel3[s]`` is how many leading blocks of stage ``s`` keep a 3x3x3
conv (the others use 1x1x1); the receptive field follows::

    receptive field   kernel3          name
    9                 (1, 1, 0, 0)     bagnet9
    17                (1, 1, 1, 0)     bagnet17
    33                (1, 1, 1, 1)     bagnet33
    177               (3, 4, 6, 3)     all 3x3x3 (a 3D ResNet-50 without max-pool)

As in the 3D paper: instance normalisation, 'same' padding and half the 2D feature maps
(``width=32``: stem 32, bottleneck widths 32/64/128/256, 1024 features).  ``width`` scales
everything for tests and CPU benchmarks.

Instance normalisation takes statistics over the whole volume, so its "local" predictions
depend on every voxel.  ``norm="channel"`` (a LayerNorm over the channels of each voxel)
makes the network *strictly local*: a location's output depends only on the voxels in its
receptive field.

Every conv and the head are plain ``nn.Conv3d`` / ``nn.Linear``, so
:func:`dwp.bayesianize` turns the network Bayesian (any prior, a deep weight prior on the
3x3x3 convs included); activations and norms are modules, so :func:`linearised` can strip
them to measure the receptive field.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "KERNEL3",
    "BagNet3D",
    "ChannelNorm3d",
    "Norm",
    "bagnet3d",
    "linearised",
    "measure_receptive_field",
]

#: ``kernel3`` per receptive field (ResNet-50 blocks ``[3, 4, 6, 3]``)
KERNEL3: dict[int, tuple[int, int, int, int]] = {
    9: (1, 1, 0, 0),
    17: (1, 1, 1, 0),
    33: (1, 1, 1, 1),
    177: (3, 4, 6, 3),
}

Norm = Literal["instance", "channel", "none"]


class ChannelNorm3d(nn.Module):
    """LayerNorm over the channels of each voxel: ``(B, C, D, H, W)`` in and out.

    Unlike instance (or batch) normalisation it uses no statistics across space, so it keeps
    a network strictly local.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "instance":
        # affine: instance norm alone would remove every channel's scale, which a
        # regression head needs
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "channel":
        return ChannelNorm3d(channels)
    return nn.Identity()


class Bottleneck3d(nn.Module):
    """ResNet bottleneck: 1x1x1 -> ``k``^3 (strided) -> 1x1x1 (x4 channels), plus shortcut.

    ``(B, C_in, D, H, W) -> (B, 4 * planes, D/s, H/s, W/s)`` (sizes rounded up).  The stride
    sits on the middle conv, as in BagNets; a projection shortcut (1x1x1, strided) is used
    when the shape changes.
    """

    expansion = 4

    def __init__(
        self, in_channels: int, planes: int, kernel_size: int, stride: int, norm: Norm
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv3d(in_channels, planes, 1, bias=False)
        self.norm1 = _norm(norm, planes)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv3d(
            planes, planes, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.norm2 = _norm(norm, planes)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv3d(planes, out_channels, 1, bias=False)
        self.norm3 = _norm(norm, out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False),
                _norm(norm, out_channels),
            )
        self.act3 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.act2(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.act3(out + self.shortcut(x))


class BagNet3D(nn.Module):
    """A 3D BagNet with a regression or classification head.

    Parameters
    ----------
    in_channels
        Image channels.
    out_features
        Outputs of the linear head: 1 for age regression, ``C`` logits for classification.
    kernel3
        Leading 3x3x3 blocks per stage (see the module docstring and :data:`KERNEL3`).
    layers
        Bottleneck blocks per stage (ResNet-50: ``(3, 4, 6, 3)``).
    strides
        Stride of the first block of each stage.
    width
        Stem channels and first-stage bottleneck width; stage ``s`` has ``width * 2**s``
        (its output ``4 * width * 2**s`` channels).  32 is the 3D paper's.
    norm
        ``"instance"`` (the paper), ``"channel"`` (strictly local) or ``"none"``.

    Notes
    -----
    Input ``(B, C, D, H, W)``; :meth:`forward` returns ``(B, out_features)``,
    :meth:`local_map` ``(B, out_features, d, h, w)`` with ``d = ceil(D / s)``, ``s =``
    :attr:`total_stride` (8 by default).  Local voxel ``i`` is centred on input voxel
    ``s * i`` (odd kernels, 'same' padding), so its grid is the input's subsampled by ``s``
    from the first voxel (:func:`regression3d.nifti.local_map_affine`).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_features: int = 1,
        *,
        kernel3: Sequence[int] = KERNEL3[9],
        layers: Sequence[int] = (3, 4, 6, 3),
        strides: Sequence[int] = (2, 2, 2, 1),
        width: int = 32,
        norm: Norm = "instance",
    ) -> None:
        super().__init__()
        layers, strides, kernel3 = tuple(layers), tuple(strides), tuple(kernel3)
        if not (len(layers) == len(strides) == len(kernel3)):
            raise ValueError(
                f"layers {layers}, strides {strides} and kernel3 {kernel3} must have one "
                "entry per stage"
            )
        if any(not 0 <= k <= n for k, n in zip(kernel3, layers, strict=True)):
            raise ValueError(f"kernel3 {kernel3} must be between 0 and layers {layers}")
        if width < 1 or in_channels < 1 or out_features < 1:
            raise ValueError(
                f"width, in_channels and out_features must be >= 1, got {width}, "
                f"{in_channels}, {out_features}"
            )
        if norm not in ("instance", "channel", "none"):
            raise ValueError(f"norm must be 'instance', 'channel' or 'none', got {norm!r}")
        self.kernel3, self.layers, self.strides, self.norm = kernel3, layers, strides, norm
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, width, 1, bias=False),
            nn.Conv3d(width, width, 3, padding=1, bias=False),
            _norm(norm, width),
            nn.ReLU(),
        )
        stages, channels = [], width
        for s, (n_blocks, stride, n3) in enumerate(zip(layers, strides, kernel3, strict=True)):
            planes = width * 2**s
            blocks = []
            for b in range(n_blocks):
                blocks.append(
                    Bottleneck3d(
                        channels, planes, 3 if b < n3 else 1, stride if b == 0 else 1, norm
                    )
                )
                channels = planes * Bottleneck3d.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = channels
        self.head = nn.Linear(channels, out_features)

    @property
    def total_stride(self) -> int:
        """Input voxels per local-map voxel along each axis (8 for ``[2, 2, 2, 1]``)."""
        out = 1
        for s in self.strides:
            out *= s
        return out

    @property
    def receptive_field(self) -> int:
        """Receptive field in input voxels along each axis, from the architecture."""
        field, jump = 3, 1  # the stem: a 1x1x1 then a 3x3x3 conv
        for n3, stride in zip(self.kernel3, self.strides, strict=True):
            for b in range(n3):  # each 3x3x3 conv adds 2 steps of the current jump
                field += 2 * jump
                if b == 0:
                    jump *= stride
            if n3 == 0:
                jump *= stride
        return field

    def features(self, x: Tensor) -> Tensor:
        """Local features ``(B, num_features, d, h, w)`` of ``x`` ``(B, C, D, H, W)``."""
        if x.dim() != 5:
            raise ValueError(f"x must be (B, C, D, H, W), got shape {tuple(x.shape)}")
        return self.stages(self.stem(x))

    def local_map(self, x: Tensor) -> Tensor:
        """The head at every location: ``(B, out_features, d, h, w)`` (regression values or
        logits)."""
        return self.head(self.features(x).movedim(1, -1)).movedim(-1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Global prediction ``(B, out_features)``: the mean of :meth:`local_map`."""
        # the head once on the pooled features: equal to the mean of the local map (the
        # head is affine), and one weight sample for the whole volume in a Bayesian head
        return self.head(self.features(x).mean(dim=(2, 3, 4)))


def bagnet3d(receptive_field: int, **kwargs) -> BagNet3D:
    """A :class:`BagNet3D` with receptive field 9, 17, 33 or 177 (keyword arguments passed on)."""
    if receptive_field not in KERNEL3:
        raise ValueError(f"receptive_field must be one of {sorted(KERNEL3)}, got {receptive_field}")
    return BagNet3D(kernel3=KERNEL3[receptive_field], **kwargs)


def linearised(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every activation and normalisation replaced by identity.

    Convolutions (and their Bayesian twins) are kept, with the absolute values of their
    weights: all paths then add with the same sign, so no gradient cancels to zero by
    accident and the gradient's support is exactly the receptive field.
    """
    out = copy.deepcopy(model)
    strip = (
        nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
        nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, ChannelNorm3d,
        nn.Dropout, nn.Dropout3d,
    )  # fmt: skip
    for name, module in list(out.named_modules()):
        if name and isinstance(module, strip):
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, nn.Identity())
    with torch.no_grad():
        for module in out.modules():
            if isinstance(module, (nn.Conv3d, nn.Linear)):
                module.weight.abs_()
    return out


def measure_receptive_field(
    features: nn.Module, shape: Sequence[int], location: Sequence[int] | None = None
) -> tuple[int, int, int]:
    """Receptive field of one output location, measured from input gradients.

    Parameters
    ----------
    features
        A function of ``(1, C, D, H, W)`` returning ``(1, K, d, h, w)`` -- typically the
        :meth:`BagNet3D.features` of a :func:`linearised` copy, wrapped in a module.
    shape
        Input shape ``(C, D, H, W)``; large enough that the field does not reach the border.
    location
        Output voxel ``(i, j, k)``; default the centre of the output grid.

    Returns
    -------
    tuple of int
        Extent (in input voxels) of the nonzero gradient along each spatial axis.
    """
    if len(shape) != 4:
        raise ValueError(f"shape must be (C, D, H, W), got {tuple(shape)}")
    x = torch.ones(1, *shape, dtype=torch.float64, requires_grad=True)
    net = copy.deepcopy(features).double()
    out = net(x)
    if location is None:
        location = tuple(n // 2 for n in out.shape[2:])
    out[(0, slice(None), *location)].sum().backward()
    support = x.grad[0].abs().sum(0) > 0
    extents = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = torch.nonzero(support.any(dim=other)).flatten()
        extents.append(int(hit.max() - hit.min() + 1) if len(hit) else 0)
    return tuple(extents)

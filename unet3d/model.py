"""The reference 3D U-Net of Kuzina et al. (2019), appendix B.

A residual, pre-activation 3D U-Net with instance normalisation: three stride-2 levels,
additive skip connections and no biases anywhere.  With the default widths
``(16, 32, 32, 64)``, one input channel and two classes it has exactly **726,480
parameters**::

    block      layers (C_in -> C_out, kernel, stride)                     parameters
    init_conv  1 -> 16 3^3                                                       432
    down1      16 -> 32 3^3 s2, 32 -> 32 3^3, shortcut 16 -> 32 1^3 s2        41,984
    down2      32 -> 32 3^3, 32 -> 32 3^3                                     55,296
    down3      32 -> 32 3^3 s2, 32 -> 32 3^3, shortcut 32 -> 32 1^3 s2        56,320
    down4      32 -> 32 3^3, 32 -> 32 3^3                                     55,296
    down5      32 -> 64 3^3 s2, 64 -> 64 3^3, shortcut 32 -> 64 1^3 s2       167,936
    down6      64 -> 64 3^3, 64 -> 64 3^3                                    221,184
    up1        reduce 64 -> 32 1^3, 32 -> 32 3^3, 32 -> 32 3^3                57,344
    up2        reduce 32 -> 32 1^3, 32 -> 32 3^3, 32 -> 32 3^3                56,320
    up3        reduce 32 -> 16 1^3, 16 -> 16 3^3, 16 -> 16 3^3                14,336
    out        16 -> 2 1^3                                                        32
    total                                                                    726,480

That is 26,640 3x3x3 kernel slices (``C_out * C_in`` summed over the 3x3x3 convs;
719,280 weights) plus 7,200 weights in 1x1x1 convs (3,584 in the shortcuts, 3,584 in
the decoder's width reductions, 32 in the output layer).  The count is exact only
because every conv is bias-free and ``InstanceNorm3d`` is used with ``affine=False``
(torch's default): a bias on the output layer alone adds ``n_classes`` parameters
(726,482 in the default size): ``UNet3D(out_bias=True)`` is a documented deviation.  It
exists because the bias-free output maps a silent feature map to p = 1/2 for every
class, a fixed point small-data runs can get stuck in (:mod:`unet3d.losses`).

The paper makes the 3x3x3 convs Bayesian (:func:`kernel3_layers` lists them for
:func:`dwp.bayesianize`) and keeps the 1x1x1 convs deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

__all__ = [
    "SIZE_DIVISOR",
    "BasicDownBlock",
    "BasicUpBlock",
    "ConvBlock",
    "UNet3D",
    "count_kernels",
    "kernel3_layers",
]

#: Three stride-2 levels: every spatial size must be divisible by 2^3.
SIZE_DIVISOR = 8

Init = Literal["he", "torch"]


class ConvBlock(nn.Sequential):
    """Pre-activation conv unit: ``InstanceNorm3d -> ReLU -> Conv3d`` (the paper's ConvBlock).

    Parameters
    ----------
    in_channels, out_channels
        Channels of the input and the output.
    kernel_size
        1 or 3; a 3x3x3 conv is padded by 1 so that stride 1 keeps the size and stride 2
        halves an even size, like the 1x1x1 stride-2 shortcut it is added to.
    stride
        1, or 2 to halve every spatial size (sizes must be even).
    bias
        Give the conv a bias (zero-initialised).  Only the output unit may want one: every
        other unit's output is normalised per channel by the next, which cancels a bias.

    Notes
    -----
    Children ``norm``, ``act``, ``conv`` (so the conv's qualified name ends in ``.conv``).
    Input ``(B, in_channels, D, H, W)``, output ``(B, out_channels, D/stride, H/stride,
    W/stride)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        bias: bool = False,
    ) -> None:
        if kernel_size not in (1, 3):
            raise ValueError(f"kernel_size must be 1 or 3, got {kernel_size}")
        super().__init__()
        # affine=False (torch's default): no parameters, which the 726,480 count requires
        self.norm = nn.InstanceNorm3d(in_channels)
        # in place: the norm's backward needs its input and saved statistics, not its output
        self.act = nn.ReLU(inplace=True)
        self.conv = nn.Conv3d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=bias,
        )


class BasicDownBlock(nn.Module):
    """Residual encoder block: two pre-activation 3x3x3 convs plus a shortcut.

    Parameters
    ----------
    in_channels, out_channels
        Channels of the input and the output.
    stride
        2 for the downsampling blocks (the first conv is strided and the shortcut is a
        pre-activated 1x1x1 stride-2 projection), 1 otherwise (identity shortcut, which
        needs ``in_channels == out_channels``).

    Notes
    -----
    ``(B, C_in, D, H, W) -> (B, C_out, D/s, H/s, W/s)``; computes
    ``conv_2(conv_1(x)) + shortcut(x)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if stride == 1 and in_channels != out_channels:
            raise ValueError(
                f"an identity shortcut needs in_channels == out_channels, "
                f"got {in_channels} -> {out_channels}"
            )
        self.conv_1 = ConvBlock(in_channels, out_channels, 3, stride)
        self.conv_2 = ConvBlock(out_channels, out_channels, 3, 1)
        # The paper's projection ("down") is a ConvBlock, i.e. pre-activated; InstanceNorm
        # has no parameters, so this choice does not change the parameter count.
        self.shortcut: ConvBlock | None = (
            ConvBlock(in_channels, out_channels, 1, stride) if stride != 1 else None
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, D, H, W) -> (B, C_out, D/s, H/s, W/s)``."""
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.conv_2(self.conv_1(x)) + identity


class BasicUpBlock(nn.Module):
    """Decoder block: reduce width, upsample x2, add the skip, two residual 3x3x3 convs.

    Parameters
    ----------
    in_channels
        Channels of the coarser input.
    out_channels
        Channels of the encoder feature map it is added to, and of the output.

    Notes
    -----
    ``x: (B, C_in, D, H, W)``, ``skip: (B, C_out, 2D, 2H, 2W)`` ->
    ``(B, C_out, 2D, 2H, 2W)``; computes ``h = upsample(reduce(x)) + skip`` and returns
    ``conv_2(conv_1(h)) + h``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        # reduce before upsampling: the 1x1x1 conv then runs on 8x fewer voxels
        self.reduce = ConvBlock(in_channels, out_channels, 1, 1)
        self.upsample = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.conv_1 = ConvBlock(out_channels, out_channels, 3, 1)
        self.conv_2 = ConvBlock(out_channels, out_channels, 3, 1)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """``(B, C_in, D, H, W), (B, C_out, 2D, 2H, 2W) -> (B, C_out, 2D, 2H, 2W)``."""
        h = self.upsample(self.reduce(x)) + skip  # additive skip, not concatenation
        return self.conv_2(self.conv_1(h)) + h


class UNet3D(nn.Module):
    """The 3D U-Net of Kuzina et al. (2019), appendix B.

    Encoder: a plain 3x3x3 ``init_conv`` (no norm before it: it sees the image), then six
    residual blocks ``down1``..``down6`` (``w0 -> w1`` strided, ``w1 -> w1``, ``w1 -> w2``
    strided, ``w2 -> w2``, ``w2 -> w3`` strided, ``w3 -> w3``).  Decoder: ``up1``..``up3``
    (``w3 -> w2``, ``w2 -> w1``, ``w1 -> w0``), each adding the encoder map of its
    resolution (outputs of ``down4``, ``down2``, ``init_conv``).  Output: ``out``, a
    pre-activated 1x1x1 conv to ``n_classes`` logits, bias-free unless ``out_bias``.

    With the defaults the model has exactly **726,480 parameters** and **26,640 3x3x3
    kernel slices** (see the module docstring for the per-block breakdown).  The "4x
    wider" variant ``widths=(64, 128, 128, 256)`` has 16x the 3x3x3 slices except for
    those of ``init_conv`` (which grow 4x): 426,048 slices.

    Parameters
    ----------
    in_channels
        Channels of the input image (1 for one MRI modality).
    n_classes
        Channels of the output logits.
    widths
        Channel widths ``(w0, w1, w2, w3)`` of the full, 1/2, 1/4 and 1/8 resolutions.
    init
        ``"he"`` (default, the paper's random-init baseline): every conv weight drawn from
        ``N(0, 2 / fan_in)`` (``kaiming_normal_``, ``mode="fan_in"``, ReLU gain).  Fan-in
        keeps the variance of each conv's output equal to that of its (post-ReLU) input, so
        the residual branch and the shortcut it is added to start on the same scale;
        ``fan_out`` would shrink the widening convs' outputs instead.  ``"torch"`` keeps
        torch's default (Kaiming-uniform with ``a = sqrt(5)``).
    out_bias
        Give the output conv a bias (``n_classes`` more parameters, zero-initialised).  The
        reference network has none, so ``False`` is the default; but without one a
        feature map that is all zero after the last ReLU gives every class the same logit,
        and a run that switches off its foreground channels inside the lesion sits at
        p = 1/2 there, at the ceiling of its soft Dice, with no gradient out
        (:mod:`unet3d.losses`).  A source network without the bias loads into a model with
        it (:func:`unet3d.checkpoint.load_source`): the bias starts at zero, so the model
        computes the source's function.

    Notes
    -----
    Input ``(B, in_channels, D, H, W)`` with D, H, W divisible by 8 (and at least two
    voxels at the 1/8 resolution, which instance normalisation needs); output logits
    ``(B, n_classes, D, H, W)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 2,
        widths: Sequence[int] = (16, 32, 32, 64),
        init: Init = "he",
        out_bias: bool = False,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"widths must be four positive channel counts, got {widths}")
        if in_channels < 1 or n_classes < 1:
            raise ValueError(
                f"in_channels and n_classes must be positive, got {in_channels}, {n_classes}"
            )
        if init not in ("he", "torch"):
            raise ValueError(f"init must be 'he' or 'torch', got {init!r}")
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.widths = widths
        self.init = init
        self.out_bias = bool(out_bias)
        w0, w1, w2, w3 = widths

        self.init_conv = nn.Conv3d(in_channels, w0, 3, padding=1, bias=False)
        self.down1 = BasicDownBlock(w0, w1, stride=2)
        self.down2 = BasicDownBlock(w1, w1)
        self.down3 = BasicDownBlock(w1, w2, stride=2)
        self.down4 = BasicDownBlock(w2, w2)
        self.down5 = BasicDownBlock(w2, w3, stride=2)
        self.down6 = BasicDownBlock(w3, w3)
        self.up1 = BasicUpBlock(w3, w2)
        self.up2 = BasicUpBlock(w2, w1)
        self.up3 = BasicUpBlock(w1, w0)
        self.out = ConvBlock(w0, n_classes, kernel_size=1, bias=self.out_bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise every conv weight according to ``self.init``; the output bias (if
        any) to zero, so that it starts neutral between the classes."""
        for module in self.modules():
            if isinstance(module, nn.Conv3d):  # a dwp.BayesConv3d too (its posterior mean)
                if self.init == "he":
                    nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                else:
                    module.reset_parameters()
        if self.out.conv.bias is not None:
            nn.init.zeros_(self.out.conv.bias)

    def check_input(self, x: Tensor) -> None:
        """Raise ``ValueError`` naming ``x.shape`` if the network cannot take ``x``."""
        shape = tuple(x.shape)
        if x.dim() != 5:
            raise ValueError(
                f"UNet3D expects a 5-D input (B, {self.in_channels}, D, H, W), got shape {shape}"
            )
        if shape[1] != self.in_channels:
            raise ValueError(
                f"UNet3D was built for {self.in_channels} input channel(s), "
                f"got input of shape {shape}"
            )
        spatial = shape[2:]
        if any(s % SIZE_DIVISOR for s in spatial):
            raise ValueError(
                f"UNet3D needs D, H, W divisible by {SIZE_DIVISOR} (three stride-2 levels), "
                f"got input of shape {shape}"
            )
        bottom = 1
        for s in spatial:
            bottom *= s // SIZE_DIVISOR
        if bottom < 2:
            # InstanceNorm cannot normalise a single voxel at the 1/8 resolution
            raise ValueError(
                f"UNet3D needs more than one voxel at 1/{SIZE_DIVISOR} resolution "
                f"(e.g. 16x8x8), got input of shape {shape}"
            )

    def forward(self, x: Tensor) -> Tensor:
        """Segmentation logits.

        Parameters
        ----------
        x
            ``(B, in_channels, D, H, W)``, D, H, W divisible by 8.

        Returns
        -------
        Tensor
            ``(B, n_classes, D, H, W)`` logits (no softmax).
        """
        self.check_input(x)
        x0 = self.init_conv(x)  # (B, w0, D, H, W)
        x1 = self.down2(self.down1(x0))  # (B, w1, D/2, H/2, W/2)
        x2 = self.down4(self.down3(x1))  # (B, w2, D/4, H/4, W/4)
        x3 = self.down6(self.down5(x2))  # (B, w3, D/8, H/8, W/8)
        h = self.up1(x3, x2)  # (B, w2, D/4, H/4, W/4)
        h = self.up2(h, x1)  # (B, w1, D/2, H/2, W/2)
        h = self.up3(h, x0)  # (B, w0, D, H, W)
        return self.out(h)  # (B, n_classes, D, H, W)


def _as_triple(kernel_size: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(kernel_size, int):
        return (kernel_size,) * 3
    triple = tuple(int(k) for k in kernel_size)
    if len(triple) != 3:
        raise ValueError(f"kernel_size must be an int or three ints, got {kernel_size!r}")
    return triple  # type: ignore[return-value]


def _convs(model: nn.Module, kernel_size: int | Sequence[int]) -> list[tuple[str, nn.Conv3d]]:
    wanted = _as_triple(kernel_size)
    # nn.Conv3d matches dwp.BayesConv3d too (a subclass), so these work after bayesianize
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv3d) and tuple(m.kernel_size) == wanted
    ]


def kernel3_layers(model: nn.Module) -> list[str]:
    """Qualified names of the 3x3x3 convs of ``model``, in module order.

    These are the layers the paper makes Bayesian (``init_conv``, ``down*.conv_*.conv``,
    ``up*.conv_*.conv``); pass them to ``dwp.bayesianize(model, include=...)``.  The 1x1x1
    convs (shortcuts, width reductions, output) stay deterministic.
    """
    return [name for name, _ in _convs(model, 3)]


def count_kernels(model: nn.Module, kernel_size: int | Sequence[int] = (3, 3, 3)) -> int:
    """Number of kernel slices of the convs with ``kernel_size``: ``sum C_out * C_in / groups``.

    26,640 for the default :class:`UNet3D` and ``(3, 3, 3)``; 7,200 for ``(1, 1, 1)``.
    """
    return sum(m.out_channels * m.in_channels // m.groups for _, m in _convs(model, kernel_size))

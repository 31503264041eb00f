"""The base regressor of Hydranet (Dubost et al. 2019, figure 2 left).

Blocks of two 3x3x3 convs with ReLU whose output is concatenated with the block's input (a
concatenating skip), a max-pool between blocks, global average pooling and a linear output
(no activation: the prediction spans the real line).  With the paper's widths ``(32, 64)``
and one input channel it has exactly the paper's **196,418 parameters**::

    block 1   1 -> 32 3^3, 32 -> 32 3^3, concat input          -> 33 channels   28,576
    max-pool 2
    block 2   33 -> 64 3^3, 64 -> 64 3^3, concat input         -> 97 channels  167,744
    GAP, linear 97 -> 1                                                            98

Convs and the output are plain torch layers, so :func:`dwp.bayesianize` makes it Bayesian.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["BaseRegressor", "SkipBlock"]


class SkipBlock(nn.Module):
    """Two ``3x3x3 conv -> ReLU`` units; the block's input is concatenated to their output.

    ``(B, C_in, D, H, W) -> (B, C_in + width, D, H, W)``.
    """

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, width, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv3d(width, width, 3, padding=1)
        self.act2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.act2(self.conv2(self.act1(self.conv1(x))))], dim=1)


class BaseRegressor(nn.Module):
    """Hydranet's base regressor at a configurable width.

    Parameters
    ----------
    in_channels
        Image channels.
    out_features
        Regression outputs (e.g. 2 for lesion count and volume together).
    widths
        Conv width of each block; ``(32, 64)`` is the paper's network.
    feature_scale
        The pooled features are multiplied by this constant before the linear output, whose
        initial weights are divided by it: the same function at initialisation and the same
        function class, but an optimiser with per-parameter step sizes (Adam) moves the
        output ``feature_scale`` times faster.  Global average pooling divides a few lesion
        voxels by the whole volume, so the output weight must grow large before a count is
        read; 1 (default) is the paper's parametrisation.

    Notes
    -----
    Input ``(B, C, D, H, W)`` (any size of at least ``2 ** (len(widths) - 1)`` per axis),
    output ``(B, out_features)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_features: int = 1,
        widths: Sequence[int] = (32, 64),
        feature_scale: float = 1.0,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1 or in_channels < 1 or out_features < 1:
            raise ValueError(
                f"widths must be positive and non-empty, in_channels and out_features >= 1; "
                f"got {widths}, {in_channels}, {out_features}"
            )
        self.widths = widths
        blocks: list[nn.Module] = []
        channels = in_channels
        for i, width in enumerate(widths):
            if i > 0:
                blocks.append(nn.MaxPool3d(2))
            blocks.append(SkipBlock(channels, width))
            channels += width
        self.blocks = nn.Sequential(*blocks)
        self.num_features = channels
        if not feature_scale > 0:
            raise ValueError(f"feature_scale must be > 0, got {feature_scale}")
        self.feature_scale = float(feature_scale)
        self.head = nn.Linear(channels, out_features)
        with torch.no_grad():
            self.head.weight /= self.feature_scale

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5:
            raise ValueError(f"x must be (B, C, D, H, W), got shape {tuple(x.shape)}")
        return self.head(self.feature_scale * self.blocks(x).mean(dim=(2, 3, 4)))

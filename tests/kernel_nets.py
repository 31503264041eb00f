"""Small source networks and a bank comparison shared by the kernel tests."""

import torch
from torch import nn

from dwp.kernel_bank import KernelBank


class Net2d(nn.Module):
    """5x5 convs (one grouped), a 1x1 conv and a transposed conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 5, padding=2)
        self.mix = nn.Conv2d(4, 4, 1)
        self.conv2 = nn.Conv2d(4, 6, 5, padding=2, groups=2, bias=False)
        self.up = nn.ConvTranspose2d(6, 2, 5)

    def forward(self, x):
        return self.up(self.conv2(self.mix(self.conv1(x))))


class TinyUNet3d(nn.Module):
    """16^3 -> 8 -> 4 -> 8 -> 16, a 3x3x3 conv at every step.

    The decoder is registered *before* the encoder, so module order and execution order
    differ.  1x1x1 convs (skip projection, head) and a BatchNorm complete the picture.
    """

    def __init__(self):
        super().__init__()
        self.dec1 = nn.Conv3d(2, 2, 3, padding=1)
        self.dec0 = nn.Conv3d(2, 2, 3, padding=1)
        self.enc0 = nn.Conv3d(1, 2, 3, padding=1)
        self.norm = nn.BatchNorm3d(2)
        self.down1 = nn.Conv3d(2, 2, 3, stride=2, padding=1)
        self.enc1 = nn.Conv3d(2, 2, 3, padding=1)
        self.down2 = nn.Conv3d(2, 2, 3, stride=2, padding=1)
        self.bottom = nn.Conv3d(2, 2, 3, padding=1)
        self.project = nn.Conv3d(2, 2, 1)
        self.head = nn.Conv3d(2, 1, 1)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x):
        x0 = self.norm(self.enc0(x))
        x1 = self.enc1(self.down1(x0))
        x2 = self.bottom(self.down2(x1))
        u1 = self.dec1(self.up(self.project(x2)) + x1)
        u0 = self.dec0(self.up(u1) + x0)
        return self.head(u0)


UNET_GROUPS = {
    "enc0": "g0_16x16x16",
    "down1": "g0_16x16x16",  # strided: the resolution of its input
    "enc1": "g1_8x8x8",
    "down2": "g1_8x8x8",
    "bottom": "g2_4x4x4",
    "dec1": "g3_8x8x8",  # not the encoder's 8^3 group
    "dec0": "g4_16x16x16",
}


def net2d(seed=0):
    torch.manual_seed(seed)
    return Net2d()


def unet(seed=0):
    torch.manual_seed(seed)
    return TinyUNet3d()


def assert_same_bank(a: KernelBank, b: KernelBank, source_names=True):
    for name in ("kernels", "group", "source", "layer"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.group_names == b.group_names
    assert a.layer_names == b.layer_names
    assert a.layer_groups == b.layer_groups
    assert a.metadata == b.metadata
    if source_names:
        assert a.source_names == b.source_names

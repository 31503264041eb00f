"""unet3d: the 3D U-Net segmentation application built on :mod:`dwp` (see the issues)."""

from .model import UNet3D, count_kernels, kernel3_layers

__all__ = ["UNet3D", "count_kernels", "kernel3_layers"]

"""unet3d: the 3D U-Net segmentation application built on :mod:`dwp` (see the issues)."""

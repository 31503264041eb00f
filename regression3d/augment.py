"""On-the-fly augmentation of training batches, from MONAI's array transforms.

:class:`RigidAugmentation` is Dubost et al. (2019)'s for Hydranet and its base regressor:
random flips along the first two axes, a random 3D rotation and a random in-plane
translation, drawn independently per image.  It is a callable on whole batches, the form
:func:`regression3d.fit`'s ``augment`` takes; a zero image (Hydranet's dropped member)
stays zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dwp.extras import from_extra

with from_extra("regression", needed_by="regression3d"):
    from monai.data import MetaTensor
    from monai.transforms import Compose, RandAffine, RandFlip

__all__ = ["RigidAugmentation"]


class RigidAugmentation:
    """Random flips, rotation and translation of every image of a batch.

    Parameters
    ----------
    rotation
        Each rotation angle (about the three axes, through the volume's centre) is drawn
        from ``U(-rotation, rotation)`` radians; the paper's 0.2.
    translation
        Shifts along the first two axes drawn from ``U(-translation, translation)`` voxels
        (none along the third); the paper's 2.
    flip_axes
        Axes each flipped with probability 0.5 (the paper: x or y, ``(0, 1)``).
    seed
        Seed of the draws: the same seed gives the same sequence of batches.

    Notes
    -----
    ``(B, C, D, H, W) -> (B, C, D, H, W)``, same dtype and device; trilinear resampling with
    zeros outside the volume.
    """

    def __init__(
        self,
        rotation: float = 0.2,
        translation: float = 2.0,
        flip_axes: Sequence[int] = (0, 1),
        *,
        seed: int = 0,
    ) -> None:
        if rotation < 0 or translation < 0:
            raise ValueError(
                f"rotation and translation must be >= 0, got {rotation} and {translation}"
            )
        if any(axis not in (0, 1, 2) for axis in flip_axes):
            raise ValueError(f"flip_axes must be spatial axes 0, 1 or 2, got {tuple(flip_axes)}")
        transforms = [RandFlip(prob=0.5, spatial_axis=axis) for axis in flip_axes]
        transforms.append(
            RandAffine(
                prob=1.0,
                rotate_range=(rotation, rotation, rotation),
                translate_range=(translation, translation, 0.0),
                padding_mode="zeros",
                mode="bilinear",
            )
        )
        self.transform = Compose(transforms)
        self.transform.set_random_state(seed=seed)

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 5:
            raise ValueError(f"x must be (B, C, D, H, W), got shape {tuple(x.shape)}")
        out = []
        for image in x:
            moved = self.transform(image)
            out.append(moved.as_tensor() if isinstance(moved, MetaTensor) else moved)
        return torch.stack(out).to(x.dtype)

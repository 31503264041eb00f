"""Per-subject random deformation: a small affine and a smooth elastic displacement.

Image channels (tissue and lesion probabilities) are warped together through one sampling
grid, so labels derived from the warped lesion maps stay aligned with the image. All the
arithmetic is element-wise (numpy, then ``torch.nn.functional.grid_sample`` on CPU), which
gives bit-identical results for a given seed whatever the number of threads.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = ["random_grid", "smooth_noise", "warp"]


def smooth_noise(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    resolution: float,
    spacing_mm: float,
    sd: float,
    channels: int = 1,
) -> np.ndarray:
    """A smooth random field: Gaussian noise on a coarse lattice, smoothed and upsampled.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness (consumed by exactly ``channels * prod(coarse shape)`` normals).
    shape : tuple of int
        Output grid shape (X, Y, Z).
    resolution : float
        Voxel size in mm.
    spacing_mm : float
        Correlation length: lattice spacing of the coarse noise in mm.
    sd : float
        Approximate standard deviation of the output.
    channels : int
        Number of independent fields.

    Returns
    -------
    numpy.ndarray
        ``float32`` array of shape ``(channels, *shape)``.
    """
    coarse_shape = [max(2, int(np.ceil(n * resolution / spacing_mm)) + 1) for n in shape]
    coarse = rng.standard_normal((channels, *coarse_shape))
    # Smoothing the lattice removes the kinks trilinear upsampling would otherwise show.
    coarse = ndimage.gaussian_filter(coarse, sigma=(0, 0.7, 0.7, 0.7), mode="nearest")
    coarse *= sd / max(float(coarse.std()), 1e-12)
    field = F.interpolate(
        torch.from_numpy(coarse.astype(np.float32))[None],
        size=tuple(shape),
        mode="trilinear",
        align_corners=True,
    )[0]
    return field.numpy()


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_grid(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    resolution: float,
    *,
    rotation_deg: float = 4.0,
    scale: float = 0.04,
    translation_mm: float = 3.0,
    elastic_mm: float = 2.5,
    elastic_spacing_mm: float = 16.0,
    global_scale: float = 1.0,
    enabled: bool = True,
) -> torch.Tensor:
    """Sampling grid of a random affine + elastic deformation, for :func:`warp`.

    The subject's point ``p`` (mm from the grid centre) samples the template at
    ``A p + t + u(p)``: ``A`` rotates by up to ``rotation_deg`` about each axis and scales each
    axis by ``1 +- scale`` (divided by ``global_scale``, so ``global_scale > 1`` makes a larger
    brain), ``t`` translates by up to ``translation_mm``, and ``u`` is a smooth displacement
    of about ``elastic_mm`` standard deviation.

    Parameters
    ----------
    rng : numpy.random.Generator
        Always consumed the same way (also when ``enabled`` is False), so that the draws after
        it do not depend on whether the deformation is applied.
    shape : tuple of int
        Grid shape (X, Y, Z).
    resolution : float
        Voxel size in mm.
    enabled : bool
        False gives the identity deformation (still scaled by ``global_scale``).

    Returns
    -------
    torch.Tensor
        ``float32`` grid of shape ``(1, X, Y, Z, 3)`` in ``grid_sample``'s normalised
        ``(z, y, x)`` order, ``align_corners=True``.
    """
    angles = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, size=3))
    scales = 1.0 + rng.uniform(-scale, scale, size=3)
    translation = rng.uniform(-translation_mm, translation_mm, size=3)
    elastic = smooth_noise(rng, shape, resolution, elastic_spacing_mm, elastic_mm, channels=3)
    if enabled:
        matrix = _rotation(angles) @ np.diag(1.0 / scales)
    else:
        matrix, translation, elastic = np.eye(3), np.zeros(3), np.zeros_like(elastic)
    matrix = matrix / global_scale
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    axes = [
        (np.arange(n, dtype=np.float64) - c) * resolution
        for n, c in zip(shape, centre, strict=True)
    ]
    p = np.meshgrid(*axes, indexing="ij")
    grid = np.empty((*shape, 3), dtype=np.float32)
    for a in range(3):
        # Written out element-wise (no BLAS), so that the result is bit-reproducible.
        source = (
            matrix[a, 0] * p[0] + matrix[a, 1] * p[1] + matrix[a, 2] * p[2] + translation[a]
        ) + elastic[a]
        index = source / resolution + centre[a]
        # grid_sample wants normalised coordinates in reversed axis order (W, H, D).
        grid[..., 2 - a] = 2.0 * index / (shape[a] - 1) - 1.0
    return torch.from_numpy(grid)[None]


def warp(volumes: np.ndarray, grid: torch.Tensor, mode: str = "bilinear") -> np.ndarray:
    """Resample ``volumes`` (C, X, Y, Z) through ``grid``; outside the template reads 0.

    Parameters
    ----------
    volumes : numpy.ndarray
        Channels to warp together.
    grid : torch.Tensor
        From :func:`random_grid`.
    mode : str
        ``"bilinear"`` (trilinear in 3D) for probabilities, ``"nearest"`` for label maps.

    Returns
    -------
    numpy.ndarray
        ``float32`` array of the same shape.
    """
    x = torch.from_numpy(np.ascontiguousarray(volumes, dtype=np.float32))[None]
    with torch.no_grad():
        out = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=True)
    return out[0].numpy()

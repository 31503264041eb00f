"""Lesions drawn as soft ellipsoids in template space.

A lesion is a probability map with a one-voxel partial-volume ramp at its border; it is
warped with the tissues and thresholded at 0.5 to give the label, so the label is exactly
where the rendered lesion dominates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cohorts.anatomy import Anatomy

__all__ = ["Ellipsoid", "place_ellipsoids", "radius_field", "ramp", "random_rotation"]


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid in voxel-grid millimetres (``index * resolution``).

    Attributes
    ----------
    centre : tuple of float
        Centre in mm from voxel (0, 0, 0).
    radii : tuple of float
        Semi-axes in mm.
    rotation : numpy.ndarray
        3x3 rotation whose columns are the axes.
    """

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    rotation: np.ndarray

    def centre_index(self, resolution: float) -> tuple[int, int, int]:
        """The voxel holding the centre."""
        return tuple(round(c / resolution) for c in self.centre)  # type: ignore[return-value]


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3D rotation (normalised Gaussian quaternion)."""
    w, x, y, z = rng.standard_normal(4)
    n = np.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def ramp(signed_mm: np.ndarray, resolution: float) -> np.ndarray:
    """Partial volume: 1 well inside (``signed_mm`` > 0 is inside), 0 outside, linear over a voxel."""
    return np.clip(signed_mm / resolution + 0.5, 0.0, 1.0).astype(np.float32)


def radius_field(
    shape: tuple[int, int, int], resolution: float, ellipsoid: Ellipsoid, margin_mm: float = 0.0
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Normalised radius ``|R^T (x - c) / r|`` over the ellipsoid's bounding box.

    Returns
    -------
    box : tuple of slice
        Where in the grid the field lives.
    q : numpy.ndarray
        Normalised radius (1 on the surface) over ``box``.
    """
    reach = max(ellipsoid.radii) + margin_mm + 2 * resolution
    box, axes = [], []
    for c, n in zip(ellipsoid.centre, shape, strict=True):
        lo = max(0, int(np.floor((c - reach) / resolution)))
        hi = min(n, int(np.ceil((c + reach) / resolution)) + 1)
        box.append(slice(lo, hi))
        axes.append(np.arange(lo, hi) * resolution - c)
    d = np.meshgrid(*axes, indexing="ij")
    q2 = np.zeros(d[0].shape)
    for k in range(3):
        # Coordinate along the ellipsoid's k-th axis, in units of that semi-axis.
        along = sum(ellipsoid.rotation[a, k] * d[a] for a in range(3)) / ellipsoid.radii[k]
        q2 += along * along
    return tuple(box), np.sqrt(q2)


def draw(shape: tuple[int, int, int], resolution: float, ellipsoid: Ellipsoid) -> np.ndarray:
    """The ellipsoid's probability map on the full grid (``float32``)."""
    out = np.zeros(shape, dtype=np.float32)
    box, q = radius_field(shape, resolution, ellipsoid)
    # Distance inside the surface, approximated along the shortest semi-axis.
    out[box] = ramp((1.0 - q) * min(ellipsoid.radii), resolution)
    return out


def place_ellipsoids(
    rng: np.random.Generator,
    anatomy: Anatomy,
    candidates: np.ndarray,
    n: int,
    radius_mm: tuple[float, float],
    *,
    elongation: tuple[float, float] = (0.6, 1.0),
    gap_mm: float = 0.0,
    max_tries: int = 2000,
) -> list[Ellipsoid]:
    """Place ``n`` random ellipsoids centred on ``candidates`` voxels, ``gap_mm`` apart.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.
    anatomy : Anatomy
        Gives the grid and resolution.
    candidates : numpy.ndarray
        Boolean map of allowed centres.
    n : int
        How many.
    radius_mm : (float, float)
        Range of the longest semi-axis; the others are ``elongation`` times it. No semi-axis
        is shorter than 1.5 voxels, so that every lesion survives the threshold.
    gap_mm : float
        Minimum surface-to-surface gap between bounding spheres (keeps lesions separate
        components).

    Raises
    ------
    RuntimeError
        If the lesions do not fit after ``max_tries`` draws.
    """
    res = anatomy.resolution
    floor = 1.5 * res
    where = np.flatnonzero(candidates.ravel())
    if where.size == 0:
        raise RuntimeError("no candidate voxels for lesion centres")
    placed: list[Ellipsoid] = []
    for _ in range(max_tries):
        if len(placed) == n:
            break
        index = np.unravel_index(where[rng.integers(where.size)], anatomy.shape)
        centre = tuple(float(i) * res for i in index)
        r = rng.uniform(*radius_mm)
        ratios = np.concatenate([[1.0], rng.uniform(*elongation, size=2)])
        radii = tuple(float(max(r * k, floor)) for k in ratios)
        rotation = random_rotation(rng)
        fits = all(
            np.linalg.norm(np.subtract(centre, other.centre))
            >= max(radii) + max(other.radii) + gap_mm
            for other in placed
        )
        if fits:
            placed.append(Ellipsoid(centre, radii, rotation))  # type: ignore[arg-type]
    if len(placed) < n:
        raise RuntimeError(f"could place only {len(placed)} of {n} lesions")
    return placed

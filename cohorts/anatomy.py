"""The MNI ICBM152 anatomy that ships inside nilearn's wheel, as tissue probability maps.

The template is the ICBM 2009 nonlinear symmetric average of 152 adults (Fonov et al. 2009,
2011; Collins et al. 1999), skull-stripped and rescaled by nilearn. nilearn provides the T1,
grey-matter (GM) and white-matter (WM) maps and a brain mask; there is no CSF map, so CSF is
what the mask holds beyond GM and WM. Everything is read from the installed package, so it
works with the network blocked.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["RESOLUTIONS", "Anatomy", "check_resolution", "load_anatomy"]

#: Voxel sizes (mm) the generator accepts: 4 for tests, 2 by default, 1 is the template's own.
RESOLUTIONS: tuple[int, ...] = (1, 2, 3, 4)

#: World-coordinate box (mm, MNI space) holding the lateral and third ventricles.
_VENTRICLE_BOX = ((-30.0, 30.0), (-50.0, 35.0), (-5.0, 35.0))


@dataclass(frozen=True, eq=False)
class Anatomy:
    """Tissue maps of the template at one resolution (all arrays ``float32``, shape X, Y, Z).

    Attributes
    ----------
    resolution : int
        Voxel size in mm (isotropic).
    affine : numpy.ndarray
        4x4 voxel-to-MNI affine (the template's, scaled to the resolution).
    t1 : numpy.ndarray
        The T1 template in [0, 1].
    csf, gm, wm : numpy.ndarray
        Tissue probabilities; ``csf + gm + wm == mask`` up to rounding.
    mask : numpy.ndarray
        The brain mask (0 or 1).
    ventricles : numpy.ndarray
        Boolean map of the lateral and third ventricles.
    ventricle_distance : numpy.ndarray
        Distance in mm to the nearest ventricle voxel (0 inside).
    depth : numpy.ndarray
        Distance in mm from the outside of the brain (0 outside, ``resolution`` on the surface).
    """

    resolution: int
    affine: np.ndarray
    t1: np.ndarray
    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray
    ventricles: np.ndarray
    ventricle_distance: np.ndarray
    depth: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape (X, Y, Z)."""
        return tuple(self.mask.shape)  # type: ignore[return-value]

    @property
    def voxel_volume(self) -> float:
        """Volume of one voxel in mm^3."""
        return float(self.resolution) ** 3


def check_resolution(resolution: float) -> int:
    """Validate a voxel size and return it as an ``int``.

    Raises
    ------
    ValueError
        If ``resolution`` is not one of :data:`RESOLUTIONS`.
    """
    try:
        value = float(resolution)
    except (TypeError, ValueError):
        value = float("nan")
    if value not in RESOLUTIONS:
        raise ValueError(
            f"resolution must be one of {list(RESOLUTIONS)} mm (the template is resampled by an "
            f"integer factor of its 1 mm grid), got {resolution!r}"
        )
    return int(value)


def _world_coordinates(shape: tuple[int, ...], affine: np.ndarray) -> list[np.ndarray]:
    # The template affine is diagonal, so each world axis depends on one voxel axis only.
    return [affine[a, a] * np.arange(n) + affine[a, 3] for a, n in enumerate(shape)]


def _ventricles(csf: np.ndarray, depth: np.ndarray, affine: np.ndarray, res: int) -> np.ndarray:
    x, y, z = _world_coordinates(csf.shape, affine)
    box = np.zeros(csf.shape, dtype=bool)
    (x0, x1), (y0, y1), (z0, z1) = _VENTRICLE_BOX
    box[np.ix_((x >= x0) & (x <= x1), (y >= y0) & (y <= y1), (z >= z0) & (z <= z1))] = True
    # Deep CSF inside the central box is ventricular; sulcal CSF lies near the surface.
    candidate = box & (csf > 0.5) & (depth > 10.0)
    labels, n = ndimage.label(candidate)
    if n == 0:
        return candidate
    sizes = ndimage.sum_labels(candidate, labels, index=np.arange(1, n + 1))
    # Drop specks (enlarged perivascular spaces, partial volume) below 5% of the largest.
    keep = np.flatnonzero(sizes >= 0.05 * sizes.max()) + 1
    return np.isin(labels, keep)


@functools.lru_cache(maxsize=4)
def load_anatomy(resolution: int = 2) -> Anatomy:
    """Load the template's tissue maps at ``resolution`` mm (cached per resolution).

    Parameters
    ----------
    resolution : int
        Voxel size in mm, one of :data:`RESOLUTIONS`.

    Returns
    -------
    Anatomy
        Read-only arrays; copy before modifying.
    """
    res = check_resolution(resolution)
    # Imported here: nilearn is heavy and only the generator needs it.
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=res)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=res).get_fdata(), np.float64)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=res).get_fdata(), np.float64)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=res).get_fdata(), np.float64)
    mask = (mask > 0.5).astype(np.float64)
    gm, wm = np.clip(gm, 0, 1) * mask, np.clip(wm, 0, 1) * mask
    total = gm + wm
    # A few hundred voxels have GM + WM > 1 after resampling; renormalise them.
    over = np.maximum(total, 1.0)
    gm, wm = gm / over, wm / over
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    depth = ndimage.distance_transform_edt(mask > 0.5, sampling=res)
    ventricles = _ventricles(csf, depth, t1_img.affine, res)
    ventricle_distance = ndimage.distance_transform_edt(~ventricles, sampling=res)
    arrays = {
        "t1": np.asarray(t1_img.get_fdata()),
        "csf": csf,
        "gm": gm,
        "wm": wm,
        "mask": mask,
        "ventricle_distance": ventricle_distance,
        "depth": depth,
    }
    frozen = {}
    for name, value in arrays.items():
        value = np.ascontiguousarray(value, dtype=np.float32)
        value.flags.writeable = False
        frozen[name] = value
    ventricles.flags.writeable = False
    affine = np.array(t1_img.affine, dtype=np.float64)
    affine.flags.writeable = False
    return Anatomy(resolution=res, affine=affine, ventricles=ventricles, **frozen)

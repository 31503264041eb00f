"""Full-resolution geometry: a common voxel spacing and orientation, the foreground box, and
the way back to the file's own grid.

:class:`Spatial` says what to do to every case on load (MONAI transforms on
:class:`monai.data.MetaTensor` volumes, which carry their affine through each step), in
this order:

1. **orientation** (``"RAS"``...): permute and flip the voxel axes so that they point as
   the codes say (:class:`monai.transforms.Orientation`; the closest codes for an oblique
   affine).  Exact: no interpolation.
2. **foreground crop**: keep the smallest box holding every voxel where some channel
   exceeds its own minimum, the brain of a skull-stripped scan whose background is
   constant (:class:`monai.transforms.SpatialCrop`).  Exact.  Done before the resampling,
   which then has fewer voxels to compute.
3. **spacing** (mm, along the array axes after step 1): resample to that voxel size
   (:class:`monai.transforms.Spacing`; images trilinear, labels and masks nearest
   neighbour).  The rotation of an oblique affine is kept.

Each step only changes the grid: the affine of the result maps its voxels to the same
millimetres as the file's.  The way back is therefore **one** resampling from the
network's grid (its shape and affine) onto the file's, whatever steps were taken
(:meth:`SpatialRecord.to_file_grid`, :class:`monai.transforms.SpatialResample`); after
steps 1-2 alone, and a crop / pad, a nearest-neighbour round trip is exact.

The default ``Spatial()`` does nothing, and :func:`unet3d.preprocess.preprocess` skips
this module entirely: the arrays are those of earlier releases, bit for bit.

MONAI and torch are imported when a volume is resampled, not with this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from .cases import DataError

__all__ = [
    "ORIENTATION_LABELS",
    "Interpolation",
    "Resampled",
    "Spatial",
    "SpatialRecord",
    "apply_spatial",
    "resample",
    "voxel_spacing",
]

#: The axis codes of NIfTI's world space (RAS+), as :class:`monai.transforms.Orientation`
#: reads them: an orientation takes one letter of each pair.
ORIENTATION_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))

#: How values between voxels are computed: ``"nearest"`` for labels and masks (exact on a
#: shared grid), ``"bilinear"`` (trilinear in 3D) for intensities and probabilities.
Interpolation = Literal["nearest", "bilinear"]


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """The voxel size (mm) along each array axis of ``affine`` ``(4, 4)``: the lengths of
    its first three columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))  # type: ignore[return-value]


@dataclass(frozen=True)
class Spatial:
    """What every case's grid becomes on load (see the module for the order of the steps).

    Attributes
    ----------
    spacing : float or 3 floats, optional
        Target voxel size in mm along the array axes (after ``orientation``); one number for
        isotropic voxels.  ``None`` keeps the file's.
    orientation : str, optional
        Three axis codes, one of each pair L/R, P/A, I/S (``"RAS"``: the first array axis
        points right, the second anterior, the third superior).  ``None`` keeps the file's
        voxel order.
    crop_foreground : bool
        Crop to the box of the voxels where any channel exceeds its minimum (the brain of a
        skull-stripped scan).

    Raises
    ------
    ValueError
        A spacing that is not one or three finite positive numbers, or an orientation that
        is not one letter of each pair, naming the field.
    """

    spacing: tuple[float, float, float] | None = None
    orientation: str | None = None
    crop_foreground: bool = False

    def __post_init__(self) -> None:
        if self.spacing is not None:
            object.__setattr__(self, "spacing", _spacing(self.spacing))
        if self.orientation is not None:
            object.__setattr__(self, "orientation", _orientation(self.orientation))
        object.__setattr__(self, "crop_foreground", bool(self.crop_foreground))

    @property
    def active(self) -> bool:
        """Whether any step changes the grid (``Spatial()`` does not)."""
        return self.spacing is not None or self.orientation is not None or self.crop_foreground


def _spacing(value: Any) -> tuple[float, float, float]:
    values = tuple(value) if isinstance(value, Sequence) else (value,)
    if len(values) == 1:
        values = values * 3
    bad = len(values) != 3 or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf
        for v in values
    )
    if bad:
        raise ValueError(f"spacing must be one or 3 finite numbers > 0 (mm), got {value!r}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def _orientation(value: Any) -> str:
    codes = value.upper() if isinstance(value, str) else value
    pairs = [next((p for p in ORIENTATION_LABELS if c in p), None) for c in codes or ""]
    if not isinstance(codes, str) or None in pairs or len(set(map(tuple, pairs))) != 3:
        raise ValueError(
            "orientation must be 3 axis codes, one of each pair L/R, P/A, I/S (e.g. 'RAS', "
            f"'LPS'), got {value!r}"
        )
    return codes


@dataclass(frozen=True, eq=False)
class SpatialRecord:
    """The file's grid and the network's grid of one case: what maps a prediction back.

    Attributes
    ----------
    file_shape : tuple of 3 int
        Spatial shape of the file.
    file_affine : numpy.ndarray
        ``(4, 4)``, the file's voxel-to-mm affine.
    shape : tuple of 3 int
        Spatial shape of the network's input (after every step and the crop / pad).
    affine : numpy.ndarray
        ``(4, 4)``, the affine of the network's grid.
    """

    file_shape: tuple[int, int, int]
    file_affine: np.ndarray = field(repr=False)
    shape: tuple[int, int, int]
    affine: np.ndarray = field(repr=False)

    def to_file_grid(self, array: Any, interpolation: Interpolation = "nearest") -> np.ndarray:
        """Resample ``array`` from the network's grid onto the file's: the inverse of every
        spatial step and of the crop / pad, in one resampling.

        Parameters
        ----------
        array : numpy.ndarray or torch.Tensor
            ``(*shape)`` or ``(K, *shape)``: a label map, probabilities, any map.
        interpolation
            ``"nearest"`` for labels (integer dtypes come back as they were),
            ``"bilinear"`` for probabilities and other continuous maps.

        Returns
        -------
        numpy.ndarray
            ``(*file_shape)`` or ``(K, *file_shape)``, ``array``'s dtype; 0 where the file's
            voxels lie outside the network's grid (cropped away: background).
        """
        return resample(array, self.affine, self.file_affine, self.file_shape, interpolation)


class Resampled(NamedTuple):
    """:func:`apply_spatial`'s result: the volumes on the new grid and its affine."""

    image: np.ndarray  #: ``(C, D, H, W)`` float32
    label: np.ndarray | None  #: ``(D, H, W)`` int64
    mask: np.ndarray | None  #: ``(D, H, W)`` bool
    affine: np.ndarray  #: ``(4, 4)`` float64


def _meta(array: np.ndarray, affine: np.ndarray) -> Any:
    import torch
    from monai.data import MetaTensor

    data = torch.as_tensor(np.ascontiguousarray(array))
    return MetaTensor(data, affine=torch.as_tensor(affine, dtype=torch.float64))


def _plain(tensor: Any, dtype: Any) -> np.ndarray:
    """A MetaTensor's values as a numpy array of ``dtype`` (its metadata dropped)."""
    import torch

    return np.ascontiguousarray(tensor.as_subclass(torch.Tensor).numpy(), dtype=dtype)


def apply_spatial(
    spatial: Spatial,
    image: np.ndarray,
    affine: np.ndarray,
    label: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    *,
    path: Path | str = "image",
) -> Resampled:
    """Apply ``spatial``'s steps to one case (see the module).

    Parameters
    ----------
    spatial
        The steps.
    image
        ``(C, D, H, W)`` intensities, on the grid of ``affine``.
    affine
        ``(4, 4)`` voxel-to-mm affine of the file.
    label, mask
        ``(D, H, W)`` on the same grid, or ``None``.
    path
        The image file, for the message of an image without foreground.

    Returns
    -------
    Resampled
        The volumes on the new grid (label int64, mask bool) and its affine.

    Raises
    ------
    DataError
        ``crop_foreground`` and an image whose every channel is constant, naming ``path``.
    """
    from monai import transforms as mt

    volumes = {"image": _meta(np.asarray(image, dtype=np.float32), affine)}
    nearest = {"label": label, "mask": mask}
    volumes.update(
        {k: _meta(v[None].astype(np.float32), affine) for k, v in nearest.items() if v is not None}
    )
    keys = list(volumes)
    if spatial.orientation is not None:
        orient = mt.Orientationd(keys, axcodes=spatial.orientation, labels=ORIENTATION_LABELS)
        volumes = orient(volumes)
    if spatial.crop_foreground:
        start, end = _foreground_box(volumes["image"], path)
        volumes = mt.SpatialCropd(keys, roi_start=start, roi_end=end)(volumes)
    if spatial.spacing is not None:
        modes = ["bilinear" if k == "image" else "nearest" for k in keys]
        volumes = mt.Spacingd(keys, pixdim=spatial.spacing, mode=modes)(volumes)
    out = volumes["image"]
    new_affine = np.asarray(out.affine, dtype=np.float64)
    back = {k: _plain(v[0], np.float32) for k, v in volumes.items() if k != "image"}
    return Resampled(
        image=_plain(out, np.float32),
        label=None if "label" not in back else np.rint(back["label"]).astype(np.int64),
        mask=None if "mask" not in back else back["mask"] != 0,
        affine=new_affine,
    )


def _foreground_box(image: Any, path: Path | str) -> tuple[list[int], list[int]]:
    """``(start, end)`` (end exclusive) of the voxels where any channel exceeds its minimum."""
    import torch
    from monai.transforms.utils import generate_spatial_bounding_box

    data = image.as_subclass(torch.Tensor)
    low = data.flatten(1).min(1).values.view(-1, 1, 1, 1)
    start, end = generate_spatial_bounding_box(data - low, select_fn=lambda x: x > 0)
    if any(e <= s for s, e in zip(start, end, strict=True)):
        raise DataError(
            f"{path}: no foreground to crop to (--crop-foreground, crop_foreground=): every "
            "channel is constant"
        )
    return start, end


def resample(
    array: Any,
    affine: np.ndarray,
    target_affine: np.ndarray,
    target_shape: Sequence[int],
    interpolation: Interpolation = "nearest",
) -> np.ndarray:
    """Resample ``array`` ``(*spatial)`` or ``(K, *spatial)`` on the grid of ``affine`` onto
    the grid of ``target_affine`` and ``target_shape`` (:class:`monai.transforms.SpatialResample`,
    zeros outside); integer maps come back rounded, in their dtype."""
    import torch
    from monai.transforms import SpatialResample

    values = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    channels = values.ndim == 4
    data = _meta((values if channels else values[None]).astype(np.float64), affine)
    out = SpatialResample(mode=interpolation, padding_mode="zeros", dtype=torch.float64)(
        data, dst_affine=torch.as_tensor(target_affine, dtype=torch.float64),
        spatial_size=tuple(int(n) for n in target_shape),
    )  # fmt: skip
    result = _plain(out, np.float64)
    result = result if channels else result[0]
    if np.issubdtype(values.dtype, np.integer) or values.dtype == bool:
        result = np.rint(result)
    return result.astype(values.dtype)

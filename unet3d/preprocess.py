"""Preprocessing one segmentation case: read, check, normalise, crop / pad, and back.

:func:`preprocess` turns a :class:`~unet3d.cases.Case` into the arrays the U-Net takes:
``image`` ``(C, D, H, W)`` float32 and ``label`` ``(D, H, W)`` int64.  It checks the files
(shapes, voxel spacings, affines, finite voxels, integer labels inside the declared
classes), selects modalities of a 4D image, maps labels by a table and / or binarises them
(the MRI paper's whole tumour), optionally reorients, crops to the foreground and resamples
to a common spacing (:mod:`unet3d.spatial`), normalises intensities (min-max to [0, 1] as in
the paper, or z-score inside the brain) and crops / pads to a size the U-Net accepts
(divisible by 8).  Without spatial options the voxel order is the file's and :func:`uncrop`
maps a prediction back to the file's grid; with them,
:meth:`unet3d.spatial.SpatialRecord.to_file_grid` does (one resampling).

Bad input raises :class:`~unet3d.cases.DataError` naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch

from .cases import Case, DataError
from .config import check_label_map, check_modality
from .model import SIZE_DIVISOR
from .spatial import Spatial, SpatialRecord, apply_spatial, voxel_spacing

__all__ = [
    "AFFINE_ATOL",
    "CropPad",
    "Normalise",
    "check_cases",
    "preprocess",
    "target_size",
    "uncrop",
]

#: Largest difference (mm) between two affines still counted as the same grid: NIfTI
#: stores affines in float32, so files written by different tools differ by ~1e-5 mm.
AFFINE_ATOL = 1e-3

Normalise = Literal["minmax", "zscore"]


@dataclass(frozen=True)
class CropPad:
    """Where the file's grid sits in the cropped / padded one; :func:`uncrop` inverts it.

    Attributes
    ----------
    original_shape : tuple of 3 int
        Spatial shape in the file.
    shape : tuple of 3 int
        Spatial shape after cropping / padding.
    offset : tuple of 3 int
        Index in the new grid of the file's voxel 0, per axis: positive where the axis was
        padded (that many voxels before it), negative where it was cropped.
    """

    original_shape: tuple[int, int, int]
    shape: tuple[int, int, int]
    offset: tuple[int, int, int]


# ---------------------------------------------------------------------------------------------
# Crop / pad


def _crop_pad(shape: Sequence[int], target: Sequence[int]) -> CropPad:
    """Centre ``shape`` in ``target``: the odd voxel of a pad goes after, of a crop before."""
    offset = tuple(
        (t - n) // 2 if t >= n else -((n - t + 1) // 2) for n, t in zip(shape, target, strict=True)
    )
    return CropPad(tuple(shape), tuple(target), offset)  # type: ignore[arg-type]


def _place(array: Any, shape: Sequence[int], offset: Sequence[int], fill: float = 0) -> Any:
    """Copy ``array`` (``(..., D, H, W)``, numpy or torch) into a ``fill``-ed array of spatial
    ``shape``, its voxel 0 at index ``offset`` (negative: the array's start is cut off)."""
    lead = tuple(array.shape[:-3])
    if isinstance(array, torch.Tensor):
        out = torch.full((*lead, *shape), fill, dtype=array.dtype, device=array.device)
    else:
        out = np.full((*lead, *shape), fill, dtype=array.dtype)
    src, dst = [], []
    for n, t, o in zip(array.shape[-3:], shape, offset, strict=True):
        start, stop = max(0, o), min(t, o + n)
        dst.append(slice(start, stop))
        src.append(slice(start - o, stop - o))
    out[(..., *dst)] = array[(..., *src)]
    return out


def uncrop(prediction: Any, record: CropPad, fill: float = 0) -> Any:
    """Map a prediction on the cropped / padded grid back to the file's grid.

    Parameters
    ----------
    prediction : numpy.ndarray or torch.Tensor
        ``(..., *record.shape)``: a label map ``(D, H, W)``, probabilities ``(K, D, H, W)``...
    record : CropPad
        The ``"crop"`` entry of a :class:`SegmentationDataset` item.
    fill : float
        Value of the voxels that were cropped away (the network never saw them).

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``(..., *record.original_shape)``, same type, dtype (and device) as ``prediction``.
    """
    if tuple(prediction.shape[-3:]) != tuple(record.shape):
        raise ValueError(
            f"prediction has spatial shape {tuple(prediction.shape[-3:])}, the crop record "
            f"expects {record.shape}"
        )
    return _place(prediction, record.original_shape, [-o for o in record.offset], fill)


# ---------------------------------------------------------------------------------------------
# Reading and checking files


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Array (scaled by the header's slope / intercept) and affine of a NIfTI file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        image = nib.load(path)
        return np.asanyarray(image.dataobj), np.asarray(image.affine, dtype=np.float64)
    except Exception as error:  # nibabel raises many types for a damaged file
        raise DataError(f"{path}: cannot read it as NIfTI ({error})") from error


def _header(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of a NIfTI file, from its header alone (no voxels are read)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        image = nib.load(path)
        return tuple(int(n) for n in image.shape), np.asarray(image.affine, dtype=np.float64)
    except Exception as error:  # nibabel raises many types for a damaged file
        raise DataError(f"{path}: cannot read it as NIfTI ({error})") from error


def _squeeze_trailing_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    # the shape-only twin of _squeeze_trailing
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _squeeze_trailing(array: np.ndarray) -> np.ndarray:
    # Some tools write 3D maps as (D, H, W, 1) or (D, H, W, 1, 1).
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def _check_grid(
    path: Path,
    shape: tuple[int, ...],
    affine: np.ndarray,
    ref: Path,
    ref_shape: tuple[int, ...],
    ref_affine: np.ndarray,
    what: str,
) -> None:
    """A DataError naming ``path`` unless its grid (voxel spacing, shape, affine) is the
    image's ``ref``; the spacing first, the usual cause of the other two differing."""
    spacing, ref_spacing = voxel_spacing(affine), voxel_spacing(ref_affine)
    if not np.allclose(spacing, ref_spacing, rtol=0, atol=AFFINE_ATOL):
        raise DataError(
            f"{path}: {what} voxel spacing {_mm(spacing)} mm differs from the image's "
            f"{_mm(ref_spacing)} mm ({ref}); resample the {what} onto the image's grid"
        )
    if shape != ref_shape:
        raise DataError(
            f"{path}: {what} shape {shape} differs from the image's {ref_shape} ({ref})"
        )
    if not np.allclose(affine, ref_affine, rtol=0, atol=AFFINE_ATOL):
        raise DataError(
            f"{path}: {what} affine differs from the image's ({ref}), by up to "
            f"{np.abs(affine - ref_affine).max():.3g} mm:\n{affine}\nvs\n{ref_affine}"
        )


def _mm(spacing: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in spacing) + ")"


def _check_labels(path: Path, label: np.ndarray, classes: int | None) -> np.ndarray:
    """Integer labels in ``[0, classes)`` as int64, or a DataError naming the bad values."""
    if not np.issubdtype(label.dtype, np.integer):
        if not np.isfinite(label).all():
            raise DataError(f"{path}: label map has non-finite values")
        if np.any(label != np.round(label)):
            bad = np.unique(label[label != np.round(label)])[:5]
            raise DataError(f"{path}: labels must be integers, found values such as {bad}")
    label = label.astype(np.int64)
    values = np.unique(label)
    upper = np.inf if classes is None else classes
    bad = values[(values < 0) | (values >= upper)]
    if bad.size:
        declared = "non-negative" if classes is None else f"in [0, {classes})"
        raise DataError(f"{path}: labels {bad.tolist()} outside the declared classes ({declared})")
    return label


def _map_labels(label: np.ndarray, label_map: dict[int, int]) -> np.ndarray:
    """Labels through the table ``label_map``; values it does not list become 0."""
    out = np.zeros_like(label)
    for source, target in label_map.items():
        out[label == source] = target
    return out


def _check_modality(path: Path, modality: tuple[int, ...], channels: int, shape: Any) -> None:
    """A DataError naming the file unless its ``channels`` hold every one of ``modality``."""
    bad = [m for m in modality if m >= channels]
    if bad:
        raise DataError(
            f"{path}: modality {bad[0]} out of range (--modality / --modalities, modality=), "
            f"the image has {channels} channel(s) (shape {shape})"
        )


def _read_on_grid(
    path: Path, what: str, image: Path, spatial: tuple[int, ...], affine: np.ndarray
) -> np.ndarray:
    """A label or mask volume, checked to lie on the image's grid."""
    raw, own_affine = _load(path)
    raw = _squeeze_trailing(raw)
    _check_grid(path, raw.shape, own_affine, image, spatial, affine, what)
    return raw


# ---------------------------------------------------------------------------------------------
# Intensities


def _minmax(image: np.ndarray) -> np.ndarray:
    low = image.min(axis=(1, 2, 3), keepdims=True)
    span = image.max(axis=(1, 2, 3), keepdims=True) - low
    # A constant channel carries no contrast: map it to 0 rather than dividing by 0.
    return np.where(span > 0, (image - low) / np.where(span > 0, span, 1), 0).astype(np.float32)


def _zscore(path: Path, image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    out = np.zeros_like(image)
    for c, channel in enumerate(image):
        inside = channel > 0 if mask is None else mask
        if not inside.any():
            raise DataError(f"{path}: channel {c} has no voxel inside the brain to z-score")
        values = channel[inside].astype(np.float64)
        std = values.std()
        # Outside the brain stays 0, the mean of the brain after scaling.
        out[c][inside] = (values - values.mean()) / (std if std > 0 else 1.0)
    return out


# ---------------------------------------------------------------------------------------------
# One case


def target_size(size: int | Sequence[int] | None) -> tuple[int, int, int] | None:
    """A ``size=`` argument as 3 ints (a cube for one int), checked to suit the U-Net.

    Raises
    ------
    ValueError
        Not ``None``, one or 3 positive ints divisible by 8.
    """
    if size is None:
        return None
    target = tuple(size) if isinstance(size, Sequence) else (size,) * 3
    if len(target) != 3 or any(
        isinstance(t, bool) or not isinstance(t, int) or t <= 0 or t % SIZE_DIVISOR for t in target
    ):
        raise ValueError(
            f"size must be None or 3 positive ints divisible by {SIZE_DIVISOR}, got {size!r}"
        )
    return target  # type: ignore[return-value]


def check_cases(
    cases: Sequence[Case],
    modality: int | None = None,
    normalise: Normalise | None = "minmax",
) -> int:
    """Check from the file headers alone (no voxels read) that ``cases`` form one data set.

    Cheap enough to run on every training and validation case before the first epoch, so
    that a missing, damaged or mismatched file (often a validation one, otherwise first
    read after the training epochs) fails in seconds.  Voxel-level problems (NaNs, labels
    outside the classes) are still :func:`preprocess`'s, when the case is read.

    Parameters
    ----------
    cases
        The cases of one data set (training and validation together: the network takes
        one number of channels).
    modality
        The channel(s) kept of 4D images (as in :func:`preprocess`), or ``None`` for all.
    normalise
        As in :func:`preprocess`: brain masks are read (and checked) for ``"zscore"`` only.

    Returns
    -------
    int
        The number of channels every image gives the network.

    Raises
    ------
    DataError
        Naming the file: missing or unreadable, neither 3D nor 4D, ``modality`` out of
        range, a label or mask on another grid; or naming one file of each channel count
        when images differ (3D and 4D images mixed), with the way out.
    """
    channels_kept = check_modality(modality)
    first: dict[int, Path] = {}
    for case in cases:
        shape, affine = _header(case.image)
        shape = _squeeze_trailing_shape(shape) if len(shape) > 4 else shape
        if len(shape) not in (3, 4):
            raise DataError(f"{case.image}: expected a 3D or 4D image, got shape {shape}")
        channels = 1 if len(shape) == 3 else shape[3]
        if channels_kept is not None:
            _check_modality(case.image, channels_kept, channels, shape)
            channels = len(channels_kept)
        mask = case.mask if normalise == "zscore" else None
        for path, what in ((case.label, "label"), (mask, "mask")):
            if path is not None:
                own_shape, own_affine = _header(path)
                own_shape = _squeeze_trailing_shape(own_shape)
                _check_grid(path, own_shape, own_affine, case.image, shape[:3], affine, what)
        first.setdefault(channels, case.image)
    if len(first) > 1:
        examples = "; ".join(f"{path}: {n} channel(s)" for n, path in sorted(first.items()))
        raise DataError(
            f"images with different numbers of channels (3D and 4D images mixed?): "
            f"{examples}; give every image the same channels, or keep one channel of each "
            "with --modality K (modality=K)"
        )
    return next(iter(first), 1)


def preprocess(
    case: Case,
    *,
    normalise: Normalise | None = "minmax",
    modality: int | Sequence[int] | None = None,
    binarise: bool = False,
    classes: int | None = None,
    size: tuple[int, int, int] | None = None,
    label_map: dict[int, int] | None = None,
    spatial: Spatial | None = None,
    min_size: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Read, check, select, map labels, resample, normalise and crop / pad one case (see
    the module).

    Parameters
    ----------
    case
        Its files.
    normalise, modality, binarise, classes, label_map, spatial
        As in :class:`unet3d.data.SegmentationDataset`.
    size
        Spatial size after a centred crop / pad (:func:`target_size`); ``None`` pads each
        axis to the next multiple of 8.
    min_size
        With ``size=None``: pad each axis to at least this (e.g. a training patch, which
        must fit in the volume); sides divisible by 8.

    Returns
    -------
    dict
        ``image`` float32 ``(C, *shape)`` and ``label`` int64 ``(*shape)`` (or ``None``)
        numpy arrays, the file's ``affine`` and ``original_shape``, the :class:`CropPad`
        record ``crop`` (of the grid after the spatial steps) and ``spatial``: ``None``
        without spatial steps, else the :class:`~unet3d.spatial.SpatialRecord` that maps a
        prediction back onto the file's grid.

    Raises
    ------
    DataError
        Naming the file: unreadable, image / label / mask spacing, shape or affine
        mismatch, non-finite image voxels, non-integer labels or labels outside the
        classes, a modality out of range, nothing to crop to.
    """
    data, affine = _load(case.image)
    data = _squeeze_trailing(data) if data.ndim > 4 else data
    if data.ndim not in (3, 4):
        raise DataError(f"{case.image}: expected a 3D or 4D image, got shape {data.shape}")
    image = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)  # (C, D, H, W)
    channels = check_modality(modality)
    if channels is not None:
        _check_modality(case.image, channels, image.shape[0], data.shape)
        image = image[list(channels)]
    image = np.asarray(image, dtype=np.float32)
    if not np.isfinite(image).all():
        count = int((~np.isfinite(image)).sum())
        raise DataError(f"{case.image}: {count} non-finite (NaN or inf) voxels")
    file_shape = image.shape[1:]

    label = None
    if case.label is not None:
        raw = _read_on_grid(case.label, "label", case.image, file_shape, affine)
        label = _check_labels(case.label, raw, classes)
        if label_map is not None:
            label = _map_labels(label, check_label_map(label_map))
        if binarise:
            label = (label > 0).astype(np.int64)

    mask = None
    if case.mask is not None and normalise == "zscore":
        mask = _read_on_grid(case.mask, "mask", case.image, file_shape, affine) != 0

    grid, steps = affine, spatial or Spatial()
    if steps.active:
        image, label, mask, grid = apply_spatial(steps, image, affine, label, mask, path=case.image)

    if normalise == "minmax":
        image = _minmax(image)
    elif normalise == "zscore":
        image = _zscore(case.image, image, mask)

    shape = image.shape[1:]
    target = size or tuple(
        max(-(-n // SIZE_DIVISOR) * SIZE_DIVISOR, low)
        for n, low in zip(shape, min_size or (0, 0, 0), strict=True)
    )
    record = _crop_pad(shape, target)
    image = _place(image, record.shape, record.offset)
    if label is not None:
        label = _place(label, record.shape, record.offset)
    inverse = None
    if steps.active:  # voxel j of the network's grid is voxel j - offset of the resampled one
        shift = np.eye(4)
        shift[:3, 3] = [-o for o in record.offset]
        inverse = SpatialRecord(file_shape, affine, record.shape, grid @ shift)
    return {
        "image": image,
        "label": label,
        "affine": affine,
        "original_shape": tuple(file_shape),
        "crop": record,
        "spatial": inverse,
    }

"""Writing arrays as NIfTI files: the one NIfTI writer of the project.

``unet3d`` (prediction maps), ``regression3d`` (local and importance maps) and ``cohorts``
(synthetic images and labels) all write through :func:`save_nifti`, so every map on disk
follows the same rules:

* the bytes depend on the array, affine and header only (gzip with ``mtime=0`` and no file
  name), so the same input gives the same file;
* the file appears whole or not at all (:func:`dwp.io.atomic_write`);
* data types NIfTI readers accept: booleans become ``uint8`` and 64-bit integers the
  smallest of ``uint8`` / ``int16`` / ``int32`` that holds them;
* values are stored as they are (no intensity scaling, whatever the copied header says);
* the affine is stored as the sform and the qform, with the copied header's codes, or
  nibabel's for a new image (sform "aligned", qform "unknown").

:mod:`dwp` knows nothing about MRI, so this lives beside it as a small package.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from dwp.io import atomic_write

__all__ = ["NIFTI_SUFFIXES", "as_nifti_array", "nifti_bytes", "save_nifti"]

#: File name endings of NIfTI files: gzip-compressed first, so that ``endswith`` on a
#: tuple and stripping the first match both work.
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def as_nifti_array(array: Any) -> np.ndarray:
    """``array`` (numpy or torch) as a numpy array of a data type NIfTI readers accept.

    Booleans become ``uint8``; 64-bit integers the smallest of ``uint8`` / ``int16`` /
    ``int32`` holding every value (few readers accept ``int64``).  Other types pass as
    they are.

    Raises
    ------
    ValueError
        64-bit integers outside the ``int32`` range.
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.kind in "iu" and array.dtype.itemsize == 8:
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for dtype in (np.uint8, np.int16, np.int32):
            if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
                return array.astype(dtype)
        raise ValueError(f"integer values [{low}, {high}] do not fit in int32")
    return array


def nifti_bytes(
    array: Any,
    affine: Any,
    header: nib.Nifti1Header | None = None,
    *,
    compressed: bool = True,
    compresslevel: int = 6,
) -> bytes:
    """The bytes of a NIfTI-1 file holding ``array``: see :func:`save_nifti`.

    Parameters
    ----------
    array, affine, header
        As in :func:`save_nifti`.
    compressed
        gzip the bytes (a ``.nii.gz`` file) or not (``.nii``).
    compresslevel
        gzip level, 1 (fast) to 9 (small).

    Returns
    -------
    bytes
        The same for the same arguments: the gzip header has no time stamp or file name.
    """
    array = as_nifti_array(array)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4 x 4, got shape {affine.shape}")
    codes = (0, 0) if header is None else (int(header["sform_code"]), int(header["qform_code"]))
    image = nib.Nifti1Image(array, affine, None if header is None else header.copy())
    image.header.set_data_dtype(array.dtype)
    # A copied header's scaling would rescale the values on reading: store them as they are.
    image.header.set_slope_inter(1.0, 0.0)
    image.set_sform(affine, code=codes[0] or "aligned")
    image.set_qform(affine, code=codes[1])
    if header is None:
        image.header.set_xyzt_units("mm")
    data = image.to_bytes()
    # mtime 0 (and gzip.compress writes no file name): same array, same bytes
    return gzip.compress(data, compresslevel=compresslevel, mtime=0) if compressed else data


def save_nifti(
    array: Any,
    path: str | os.PathLike,
    affine: Any,
    header: nib.Nifti1Header | None = None,
    *,
    compresslevel: int = 6,
) -> Path:
    """Write an array as NIfTI, atomically (readers never see a half-written file).

    Parameters
    ----------
    array : numpy.ndarray or torch.Tensor
        ``(D, H, W)`` (or ``(D, H, W, ...)``) on the grid of ``affine``.  Booleans are
        written as ``uint8`` and 64-bit integers as the smallest of ``uint8`` / ``int16`` /
        ``int32`` holding them (:func:`as_nifti_array`); other types as they are.
    path : path
        Ends in ``.nii.gz`` (gzip-compressed) or ``.nii``.
    affine : array-like (4, 4)
        Voxel-to-world matrix, stored as both the sform and the qform.
    header : nibabel.Nifti1Header, optional
        Header to copy (e.g. the input image's): units, descriptions, sform / qform codes.
        Its data type and intensity scaling are replaced by the array's.
    compresslevel : int
        gzip level of a ``.nii.gz`` file, 1 (fast) to 9 (small).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        Another file ending, an affine that is not 4 x 4, or integers outside ``int32``;
        nothing is written then.
    """
    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{path}: a NIfTI path ends in .nii or .nii.gz")
    try:
        data = nifti_bytes(
            array,
            affine,
            header,
            compressed=path.name.endswith(".gz"),
            compresslevel=compresslevel,
        )
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    with atomic_write(path) as handle:
        handle.write(data)
    return path

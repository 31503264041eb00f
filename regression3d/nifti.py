"""Writing prediction and importance maps as NIfTI, aligned to the input image.

A BagNet's local map lives on a coarser grid than its input: local voxel ``i`` is centred on
input voxel ``s * i`` (``s`` the network's total stride), so its voxel-to-world matrix is the
input's times ``diag(s, s, s, 1)`` -- no shift.  :func:`save_local_map` writes it on that
grid, or resampled onto the input grid (trilinear, by nibabel in world coordinates), so
that it overlays the image in any viewer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import torch
from nibabel.processing import resample_from_to

import nifti_io

__all__ = ["local_map_affine", "save_local_map", "save_nifti", "upsample_to_input"]

PathLike = str | os.PathLike


def _as_affine(affine: object, what: str = "affine") -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise ValueError(f"{what} must be a finite 4x4 matrix, got shape {a.shape}")
    return a


def _as_volume(array: object, what: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    a = np.asarray(array)
    if a.ndim != 3:
        raise ValueError(f"{what} must be one (D, H, W) volume, got shape {a.shape}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{what} holds NaN or inf values")
    return a


def local_map_affine(input_affine: object, stride: int) -> np.ndarray:
    """Voxel-to-world matrix of a local map whose voxel ``i`` sits on input voxel ``stride * i``.

    Parameters
    ----------
    input_affine
        ``(4, 4)`` affine of the input image.
    stride
        The network's total stride (:attr:`BagNet3D.total_stride`).
    """
    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    return _as_affine(input_affine, "input_affine") @ np.diag([stride, stride, stride, 1.0])


def save_nifti(array: object, path: PathLike, affine: object) -> Path:
    """Write a ``(D, H, W)`` volume as NIfTI (``.nii`` or ``.nii.gz``), atomically.

    Floats are stored as float32 (maps need no more); the rest as
    :func:`nifti_io.save_nifti` stores it, with gzip level 1 (noisy float maps barely
    compress further).
    """
    volume = _as_volume(array, f"the volume for {path}")
    if volume.dtype.kind == "f":
        volume = volume.astype(np.float32)
    return nifti_io.save_nifti(volume, path, _as_affine(affine), compresslevel=1)


def upsample_to_input(
    local: object, stride: int, input_shape: tuple[int, int, int], input_affine: object
) -> np.ndarray:
    """A local map resampled (trilinear) onto the input grid, ``input_shape`` float32.

    Beyond the last local voxel (at most ``stride - 1`` input voxels) the nearest value is
    repeated.
    """
    volume = _as_volume(local, "local").astype(np.float32)
    source = nib.Nifti1Image(volume, local_map_affine(input_affine, stride))
    target = (tuple(int(n) for n in input_shape), _as_affine(input_affine, "input_affine"))
    return np.asarray(resample_from_to(source, target, order=1, mode="nearest").dataobj).astype(
        np.float32
    )


def save_local_map(
    local: object,
    path: PathLike,
    *,
    stride: int,
    input_affine: object,
    input_shape: tuple[int, int, int] | None = None,
    grid: Literal["local", "input"] = "local",
) -> Path:
    """Write a local prediction map ``(d, h, w)`` as NIfTI aligned to its input image.

    Parameters
    ----------
    local
        One channel of :meth:`BagNet3D.local_map` for one subject, ``(d, h, w)``.
    path
        ``.nii`` or ``.nii.gz``.
    stride
        The network's total stride.
    input_affine
        The input image's affine.
    input_shape
        The input image's ``(D, H, W)``; needed for ``grid="input"``.
    grid
        ``"local"``: the map's own voxels with :func:`local_map_affine`; ``"input"``: resampled
        onto the input grid (:func:`upsample_to_input`), with the input's affine.
    """
    if grid == "local":
        return save_nifti(local, path, local_map_affine(input_affine, stride))
    if grid != "input":
        raise ValueError(f"grid must be 'local' or 'input', got {grid!r}")
    if input_shape is None:
        raise ValueError("grid='input' needs input_shape")
    volume = upsample_to_input(local, stride, input_shape, input_affine)
    return save_nifti(volume, path, input_affine)

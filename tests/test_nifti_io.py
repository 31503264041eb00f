"""nifti_io: the project's one NIfTI writer."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from nifti_io import as_nifti_array, nifti_bytes, save_nifti

AFFINE = np.array(
    [[2.0, 0, 0, -10.0], [0, 2.0, 0, 5.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1]], dtype=np.float64
)


def _volume(dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(0).random((5, 6, 7)).astype(dtype)


@pytest.mark.parametrize("name", ["map.nii.gz", "map.nii"])
def test_round_trip_keeps_values_and_affine(tmp_path: Path, name: str) -> None:
    volume = _volume()
    path = save_nifti(torch.from_numpy(volume), tmp_path / name, AFFINE)
    back = nib.load(path)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), volume)
    np.testing.assert_allclose(back.affine, AFFINE)
    assert back.get_data_dtype() == np.float32
    assert back.header.get_xyzt_units()[0] == "mm"
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([0, 255]), np.uint8),
        (np.array([-1, 300]), np.int16),
        (np.array([0, 70_000]), np.int32),
        (np.array([True, False]), np.uint8),
        (np.array([0.5, 1.5]), np.float64),  # floats keep their type
    ],
)
def test_types_are_narrowed_to_what_readers_accept(values, expected, tmp_path: Path) -> None:
    volume = np.resize(values, (2, 3, 4))
    assert as_nifti_array(volume).dtype == expected
    back = nib.load(save_nifti(volume, tmp_path / "v.nii.gz", AFFINE))
    assert back.get_data_dtype() == expected
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), volume)


def test_values_beyond_int32_are_an_error_and_write_nothing(tmp_path: Path) -> None:
    volume = np.full((2, 2, 2), 2**40, dtype=np.int64)
    with pytest.raises(ValueError, match=r"big\.nii\.gz: integer values .* int32"):
        save_nifti(volume, tmp_path / "big.nii.gz", AFFINE)
    with pytest.raises(ValueError, match=r"\.nii"):
        save_nifti(_volume(), tmp_path / "map.png", AFFINE)
    assert not list(tmp_path.iterdir())


def test_same_input_same_bytes(tmp_path: Path) -> None:
    first = save_nifti(_volume(), tmp_path / "a.nii.gz", AFFINE, compresslevel=1)
    second = save_nifti(_volume(), tmp_path / "b.nii.gz", AFFINE, compresslevel=1)
    assert first.read_bytes() == second.read_bytes()
    data = first.read_bytes()
    assert data[4:8] == b"\0\0\0\0"  # gzip mtime 0 ...
    assert not data[3] & 0x08  # ... and no file name
    assert gzip.decompress(data) == nifti_bytes(_volume(), AFFINE, compressed=False)


def test_a_copied_header_keeps_its_codes_not_its_scaling(tmp_path: Path) -> None:
    source = nib.Nifti1Image(np.zeros((5, 6, 7), np.int16), AFFINE)
    source.set_sform(AFFINE, code=4)  # MNI
    source.set_qform(AFFINE, code=1)  # scanner
    source.header.set_slope_inter(2.0, 1.0)
    back = nib.load(save_nifti(_volume(), tmp_path / "p.nii.gz", AFFINE, source.header))
    assert (int(back.header["sform_code"]), int(back.header["qform_code"])) == (4, 1)
    np.testing.assert_array_equal(back.get_fdata(dtype=np.float32), _volume())
    # without a header: nibabel's codes for a new image
    fresh = nib.load(save_nifti(_volume(), tmp_path / "f.nii.gz", AFFINE))
    assert (int(fresh.header["sform_code"]), int(fresh.header["qform_code"])) == (2, 0)


def test_a_failed_write_leaves_no_temporary_file_and_the_old_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_nifti(_volume(), tmp_path / "map.nii.gz", AFFINE)
    before = path.read_bytes()

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_nifti(_volume() + 1, path, AFFINE)
    assert [p.name for p in tmp_path.iterdir()] == ["map.nii.gz"]
    assert path.read_bytes() == before

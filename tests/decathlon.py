"""Tiny Decathlon folders for the CLI and reliability tests (imported as a test helper)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np


def write_decathlon(
    root: Path,
    n_train: int = 4,
    *,
    seed: int = 0,
    affine: np.ndarray | None = None,
    test_shape: Sequence[int] | None = (16, 16, 16),
) -> Path:
    """``root`` as a Decathlon folder of ``n_train`` 16^3 noise volumes whose foreground is
    the bright voxels (``> 0.5``), plus one test image of ``test_shape`` (none for ``None``).

    NIfTI writing is deterministic, so folders of one seed share their first cases."""
    affine = np.eye(4) if affine is None else affine
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    training = []
    for i in range(n_train):
        image = rng.normal(size=(16, 16, 16)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"case{i}.nii.gz")
        label = (image > 0.5).astype(np.uint8)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"case{i}.nii.gz")
        training.append(
            {"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"}
        )
    index: dict = {"labels": {"0": "background", "1": "foreground"}, "training": training}
    if test_shape is not None:
        (root / "imagesTs").mkdir()
        test = rng.normal(size=tuple(test_shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(test, affine), root / "imagesTs" / "test0.nii.gz")
        index["test"] = ["./imagesTs/test0.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(index))
    return root

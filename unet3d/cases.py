"""Listing segmentation cases: which image and label files make up a data set.

All return :class:`Case` records whose files exist (their contents are read and checked
later, by :class:`unet3d.data.SegmentationDataset`):

* :func:`load_decathlon` reads the Medical Segmentation Decathlon layout (``dataset.json``,
  ``imagesTr/``, ``labelsTr/``, ``imagesTs/`` and, when present, ``labelsTs/``);
* :func:`load_csv` reads a table of image / label paths, relative to the table;
* :func:`load_images` lists unlabelled images to predict: one NIfTI file, a folder of them
  or a Decathlon folder's test split.

Bad input raises :class:`DataError` naming the file.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nifti_io import NIFTI_SUFFIXES

__all__ = [
    "Case",
    "DataError",
    "case_id",
    "decathlon_labels",
    "load_csv",
    "load_decathlon",
    "load_images",
]

PathLike = str | os.PathLike


class DataError(ValueError):
    """Bad input data: a missing or malformed file, or files that do not fit together.

    The message names the file(s) at fault.
    """


@dataclass(frozen=True)
class Case:
    """One subject: its id and files.

    Attributes
    ----------
    id : str
        Subject id (the image's file name without ``.nii.gz`` unless given).
    image : pathlib.Path
        Image, 3D ``(D, H, W)`` or 4D ``(D, H, W, C)`` with modalities last (Decathlon).
    label : pathlib.Path or None
        Integer label map ``(D, H, W)``; ``None`` when unlabelled (test images).
    mask : pathlib.Path or None
        Optional brain mask ``(D, H, W)`` (non-zero inside) for ``normalise="zscore"``.
    """

    id: str
    image: Path
    label: Path | None = None
    mask: Path | None = None


def case_id(path: Path) -> str:
    """The id of an image file: its name without ``.nii.gz`` / ``.nii``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _existing(path: Path, listed_in: Path) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: file not found (listed in {listed_in})")
    return path


def _dataset_json(root: PathLike) -> Path:
    root = Path(root)
    index = root if root.suffix == ".json" else root / "dataset.json"
    if not index.is_file():
        raise DataError(f"{index}: dataset.json not found (not a Decathlon folder?)")
    return index


def _read_json(index: Path) -> dict[str, Any]:
    try:
        content = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{index}: cannot read the Decathlon index ({error})") from error
    if not isinstance(content, dict):
        raise DataError(f"{index}: expected a JSON object, got {type(content).__name__}")
    return content


def decathlon_labels(root: PathLike) -> dict[int, str]:
    """The classes declared in ``dataset.json`` (its ``"labels"``), e.g. ``{0: "background",
    1: "tumour"}``; ``len(...)`` is the ``classes`` argument of :class:`SegmentationDataset`.

    Raises
    ------
    DataError
        Missing or unreadable ``dataset.json``, or no usable ``"labels"`` entry.
    """
    index = _dataset_json(root)
    labels = _read_json(index).get("labels")
    try:
        out = {int(k): str(v) for k, v in labels.items()}
    except (AttributeError, TypeError, ValueError):
        raise DataError(f"{index}: 'labels' must map class indices to names") from None
    if sorted(out) != list(range(len(out))):
        raise DataError(f"{index}: 'labels' must be 0..K-1, got {sorted(out)}")
    return out


def load_decathlon(root: PathLike, split: Literal["train", "test"] = "train") -> list[Case]:
    """List the cases of one split of a Medical Segmentation Decathlon folder.

    Parameters
    ----------
    root : path
        The folder holding ``dataset.json`` (or the path of ``dataset.json`` itself).
    split : {"train", "test"}
        ``"train"`` reads the ``"training"`` section (image and label); ``"test"`` reads the
        ``"test"`` section, whose entries are image paths (or ``{"image": ...}`` dicts); a
        test image gets the label of the same name in ``labelsTs/`` when that file exists.

    Returns
    -------
    list of Case
        In the order of ``dataset.json``; paths resolved against ``root``.

    Raises
    ------
    DataError
        Missing ``dataset.json``, a missing or empty split, a malformed entry, or a listed
        file that does not exist.
    """
    # dataset.json is small and its format fixed, so it is read here rather than by MONAI's
    # load_decathlon_datalist: errors can then name the entry at fault, and listing cases
    # does not need MONAI (an optional dependency) or its import time.
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    index = _dataset_json(root)
    base = index.parent
    section = "training" if split == "train" else "test"
    entries = _read_json(index).get(section)
    if not entries:
        raise DataError(f"{index}: the {section!r} split is missing or empty")
    if not isinstance(entries, list):
        raise DataError(f"{index}: {section!r} must be a list")
    cases = []
    for entry in entries:
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise DataError(f"{index}: malformed {section!r} entry {entry!r}")
        if split == "train" and not isinstance(entry.get("label"), str):
            raise DataError(f"{index}: training entry {entry!r} has no 'label'")
        image = _existing(base / entry["image"], index)
        label = None
        if isinstance(entry.get("label"), str):
            label = _existing(base / entry["label"], index)
        elif split == "test":
            candidate = base / "labelsTs" / image.name
            label = candidate if candidate.is_file() else None
        cases.append(Case(case_id(image), image.resolve(), label and label.resolve()))
    return cases


def load_csv(
    path: PathLike,
    image_col: str = "image",
    label_col: str | None = "label",
    id_col: str = "id",
    split: str | None = None,
    split_col: str = "split",
    mask_col: str | None = None,
) -> list[Case]:
    """List the cases of a CSV table of image / label paths.

    Parameters
    ----------
    path : path
        The CSV file, with a header row. Relative paths in it are relative to its folder.
    image_col, label_col : str
        Columns of the image and label paths; ``label_col=None`` (or an empty cell) for
        unlabelled cases.
    id_col : str
        Column of subject ids, if the table has one; otherwise the image's file name.
    split, split_col : str
        Keep only the rows whose ``split_col`` equals ``split`` (e.g. ``"train"``; the
        :mod:`cohorts` tables have such a column); ``None`` keeps every row.
    mask_col : str, optional
        Column of brain-mask paths for ``normalise="zscore"``.

    Returns
    -------
    list of Case

    Raises
    ------
    DataError
        Missing table, a missing column, no rows (after the split filter), or a listed file
        that does not exist.
    """
    table = Path(path)
    if not table.is_file():
        raise DataError(f"{table}: CSV file not found")
    with table.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        wanted = [image_col, label_col, mask_col, split_col if split is not None else None]
        for column in filter(None, wanted):
            if column not in columns:
                raise DataError(f"{table}: no column {column!r} (columns: {columns})")
        rows = [r for r in reader if split is None or r[split_col] == split]
    if not rows:
        which = "rows" if split is None else f"rows with {split_col} == {split!r}"
        raise DataError(f"{table}: no {which} (empty split)")

    def resolve(cell: str | None) -> Path | None:
        return _existing(table.parent / cell, table).resolve() if cell else None

    cases = []
    for row in rows:
        image = resolve(row[image_col])
        if image is None:
            raise DataError(f"{table}: a row has an empty {image_col!r} cell: {row}")
        label = resolve(row[label_col]) if label_col else None
        mask = resolve(row[mask_col]) if mask_col else None
        cid = row.get(id_col) or case_id(image)
        cases.append(Case(cid, image, label, mask))
    return cases


def load_images(path: PathLike) -> list[Case]:
    """Unlabelled cases of the images to predict.

    Parameters
    ----------
    path : path
        A NIfTI file (``.nii`` / ``.nii.gz``), a folder of them (sorted by name), or a
        Decathlon folder (its ``"test"`` split).

    Returns
    -------
    list of Case
        Without labels: a bad label file cannot stop a prediction.

    Raises
    ------
    DataError
        A file that is not NIfTI, no such file or folder, or a folder without NIfTI files.
    """
    path = Path(path)
    if path.is_file():
        if not path.name.endswith(NIFTI_SUFFIXES):
            raise DataError(f"{path}: not a NIfTI file (.nii or .nii.gz)")
        return [Case(case_id(path), path.resolve())]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    if (path / "dataset.json").is_file():
        return [dataclasses.replace(c, label=None) for c in load_decathlon(path, "test")]
    images = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
    if not images:
        raise DataError(f"{path}: no NIfTI files (.nii, .nii.gz) in this folder")
    return [Case(case_id(p), p.resolve()) for p in images]

"""Listing segmentation cases: which image and label files make up a data set.

All return :class:`Case` records whose files exist (their contents are read and checked
later, by :class:`unet3d.data.SegmentationDataset`):

* :func:`load_decathlon` reads the Medical Segmentation Decathlon layout (``dataset.json``,
  ``imagesTr/``, ``labelsTr/``, ``imagesTs/`` and, when present, ``labelsTs/``);
* :func:`load_csv` reads a table of image / label paths, relative to the table;
* :func:`cases_from_patterns` pairs the images and labels of any folder by file name
  patterns (``"{id}_t1.nii.gz"`` / ``"{id}_seg.nii.gz"``, ``"{id}/{id}_flair.nii.gz"``...);
* :func:`load_images` lists unlabelled images to predict: one NIfTI file, a folder of them
  (with its subfolders) or a Decathlon folder's test split.

The pattern syntax is :mod:`unet3d.patterns`'s.

Bad input raises :class:`DataError` naming the file or folder (and the pattern).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nifti_io import NIFTI_SUFFIXES

from .patterns import ID, check_pattern, compile_pattern, pattern_depth, walk_files

__all__ = [
    "Case",
    "DataError",
    "case_id",
    "cases_from_patterns",
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
        raise DataError(
            f"{index}: dataset.json not found (not a Decathlon folder? the files of any "
            "folder pair up by name with --image-pattern and --label-pattern, "
            "cases_from_patterns in Python)"
        )
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


# ---------------------------------------------------------------------------------------------
# Folders searched by pattern (the syntax is unet3d.patterns')


def _folder(root: PathLike) -> Path:
    path = Path(root)
    if not path.is_dir():
        what = "not a folder" if path.exists() else "no such folder"
        raise DataError(f"{path}: {what}")
    return path.resolve()


def _matches(pattern: str, files: Sequence[str]) -> dict[str, list[str]]:
    """``{id: [relative paths]}`` of the files ``pattern`` matches."""
    regex = compile_pattern(pattern)
    found: dict[str, list[str]] = {}
    for rel in files:
        match = regex.fullmatch(rel)
        if match is not None:
            found.setdefault(match.group("id"), []).append(rel)
    return found


def _listed(items: Iterable[str], total: int, shown: int = 3) -> str:
    items = list(items)
    more = f" and {total - shown} more" if total > shown else ""
    return ", ".join(items[:shown]) + more


def _no_match(root: Path, pattern: str, name: str, what: str = "file") -> DataError:
    """The error of a pattern that matches nothing, with a few of the folder's NIfTI files
    as a hint at what the pattern should say."""
    examples = []
    for rel in walk_files(root.resolve(), None):
        if rel.endswith(NIFTI_SUFFIXES):
            examples.append(rel)
            if len(examples) == 3:
                break
    hint = f"NIfTI files there include {', '.join(examples)}" if examples else "no NIfTI file there"
    return DataError(f"{root}: no {what} matches {name} {pattern!r} ({hint})")


def cases_from_patterns(
    root: PathLike,
    image_pattern: str,
    label_pattern: str | None,
    *,
    names: tuple[str, str] = ("image_pattern", "label_pattern"),
) -> list[Case]:
    """Pair the images and labels of a folder by file name patterns.

    The files matching ``image_pattern`` are the images; the text at its ``{id}`` is the
    case id, and ``label_pattern`` with that id is the case's label (the syntax is
    :mod:`unet3d.patterns`').  A file that ``label_pattern`` matches is never an image, so
    that ``"{id}.nii.gz"`` / ``"{id}_seg.nii.gz"`` can share a folder.

    Parameters
    ----------
    root : path
        The folder; patterns are relative to it.
    image_pattern : str
        E.g. ``"{id}_t1.nii.gz"``, ``"images/{id}.nii.gz"``, ``"*/{id}_flair.nii.gz"``
        (one folder per site) or ``"{id}/{id}_flair.nii.gz"`` (BraTS).
    label_pattern : str or None
        E.g. ``"{id}_seg.nii.gz"``, ``"labels/{id}.nii.gz"``; ``None`` for unlabelled
        cases.
    names : pair of str
        How messages name the two patterns; the command line gives its flags.

    Returns
    -------
    list of Case
        Sorted by id; absolute paths.

    Raises
    ------
    ValueError
        A malformed pattern (:func:`unet3d.patterns.check_pattern`), or the two patterns
        the same.
    DataError
        No such folder; no image matches; two images (or two labels) of one id; images
        without a label or labels without an image (naming the first few, and how many).

    Examples
    --------
    BraTS: one folder per subject, ``BraTS2021_00000/BraTS2021_00000_flair.nii.gz``...

    >>> brats = ("{id}/{id}_flair.nii.gz", "{id}/{id}_seg.nii.gz")         # doctest: +SKIP
    >>> cases = cases_from_patterns("data/brats", *brats)                 # doctest: +SKIP
    >>> cases[0].id, cases[0].label.name                                  # doctest: +SKIP
    ('BraTS2021_00000', 'BraTS2021_00000_seg.nii.gz')
    """
    image_name, label_name = names
    check_pattern(image_pattern, image_name)
    if label_pattern is not None:
        check_pattern(label_pattern, label_name)
        if label_pattern == image_pattern:
            raise ValueError(f"{image_name} and {label_name} are the same: {image_pattern!r}")
    folder = _folder(root)
    root = Path(root)  # named as given in messages
    depths = [pattern_depth(p) for p in (image_pattern, label_pattern) if p is not None]
    deepest = None if None in depths else max(d for d in depths if d is not None)
    files = list(walk_files(folder, deepest))
    labels = {} if label_pattern is None else _matches(label_pattern, files)
    label_files = {rel for rels in labels.values() for rel in rels}
    images = _matches(image_pattern, [f for f in files if f not in label_files])
    if not images:
        raise _no_match(root, image_pattern, image_name, "image")

    def check_unique(found: dict[str, list[str]], name: str, pattern: str, what: str) -> None:
        shared = {i: rels for i, rels in found.items() if len(rels) > 1}
        if shared:
            first, rels = min(shared.items())
            raise DataError(
                f"{root}: {name} {pattern!r} finds several {what}s for {len(shared)} id(s), "
                f"e.g. {first!r}: {_listed(rels, len(rels))}; each case needs an id of its "
                f"own (let {ID} cover what tells them apart)"
            )

    check_unique(images, image_name, image_pattern, "image")
    if label_pattern is not None:
        check_unique(labels, label_name, label_pattern, "label")
        unlabelled = sorted(images.keys() - labels.keys())
        if unlabelled:
            shown = [f"{i} ({images[i][0]})" for i in unlabelled[:3]]
            expected = label_pattern.replace(ID, unlabelled[0])
            raise DataError(
                f"{root}: {len(unlabelled)} of {len(images)} images have no label matching "
                f"{label_name} {label_pattern!r}: {_listed(shown, len(unlabelled))}; the label "
                f"of {unlabelled[0]} would be {expected!r}"
            )
        orphans = sorted(labels.keys() - images.keys())
        if orphans:
            shown = [f"{i} ({labels[i][0]})" for i in orphans[:3]]
            raise DataError(
                f"{root}: {len(orphans)} label(s) of {label_name} {label_pattern!r} have no "
                f"image matching {image_name} {image_pattern!r}: {_listed(shown, len(orphans))}"
            )
    return [
        Case(i, folder / images[i][0], None if label_pattern is None else folder / labels[i][0])
        for i in sorted(images)
    ]


def load_images(
    path: PathLike,
    pattern: str | None = None,
    exclude: Sequence[str] = (),
    *,
    names: tuple[str, str] = ("pattern", "exclude"),
) -> list[Case]:
    """Unlabelled cases of the images to predict.

    Parameters
    ----------
    path : path
        A NIfTI file (``.nii`` / ``.nii.gz``); a folder, searched with its subfolders; or,
        without ``pattern`` and ``exclude``, a Decathlon folder (one with a
        ``dataset.json``: its ``"test"`` split).
    pattern : str, optional
        The files of the folder to predict (:mod:`unet3d.patterns`), e.g. ``"*.nii.gz"`` (the
        top folder only) or ``"**/*_flair.nii.gz"``; an ``{id}`` in it gives the case id.
        Default: every ``.nii`` / ``.nii.gz`` file at any depth.
    exclude : sequence of str
        Patterns of files to leave out, e.g. ``"*_seg.nii.gz"``; one without a ``/``
        applies to file names in any folder.
    names : pair of str
        How messages name ``pattern`` and ``exclude``; the command line gives its flags.

    Returns
    -------
    list of Case
        Without labels (a bad label file cannot stop a prediction), in the order of
        ``dataset.json`` or sorted by path; ids are the file names without the NIfTI
        suffix (or the text at ``{id}``), unique only within a folder.  Paths are absolute,
        under the resolved folder: ``case.image.relative_to(Path(path).resolve())`` is
        where the file lies in it.

    Raises
    ------
    ValueError
        A malformed pattern, or a pattern given with a file.
    DataError
        A file that is not NIfTI, no such file or folder, a folder without NIfTI files, or
        no file matching ``pattern`` (or all of them excluded).
    """
    pattern_name, exclude_name = names
    path = Path(path)
    if pattern is not None:
        check_pattern(pattern, pattern_name, needs_id=False)
    for item in exclude:
        check_pattern(item, exclude_name, needs_id=False)
    if path.is_file():
        if pattern is not None or exclude:
            raise ValueError(f"{path}: {pattern_name} and {exclude_name} apply to a folder")
        if not path.name.endswith(NIFTI_SUFFIXES):
            raise DataError(f"{path}: not a NIfTI file (.nii or .nii.gz)")
        return [Case(case_id(path), path.resolve())]
    folder = _folder(path)  # path as given names it in messages
    if pattern is None and not exclude and (folder / "dataset.json").is_file():
        return [dataclasses.replace(c, label=None) for c in load_decathlon(path, "test")]
    files = list(walk_files(folder, pattern_depth(pattern)))
    if pattern is None:
        found = [rel for rel in files if rel.endswith(NIFTI_SUFFIXES)]
        if not found:
            raise DataError(f"{path}: no NIfTI files (.nii, .nii.gz) in this folder or below")
        regex = None
    else:
        regex = compile_pattern(pattern)
        found = [rel for rel in files if regex.fullmatch(rel)]
        if not found:
            raise _no_match(path, pattern, pattern_name)
    skip = [compile_pattern(p if "/" in p else f"**/{p}") for p in exclude]
    kept = [rel for rel in found if not any(s.fullmatch(rel) for s in skip)]
    if not kept:
        raise DataError(
            f"{path}: all {len(found)} files found are excluded by {exclude_name} "
            f"{' '.join(repr(p) for p in exclude)}"
        )

    def identify(rel: str) -> str:
        match = regex.fullmatch(rel) if regex is not None and "id" in regex.groupindex else None
        return match["id"] if match else case_id(Path(rel))

    return [Case(identify(rel), folder / rel) for rel in sorted(kept)]

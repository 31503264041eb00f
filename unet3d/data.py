"""NIfTI segmentation data for :class:`unet3d.UNet3D`: case lists, a dataset, and writing back.

Two ways to list cases, both returning :class:`Case` records whose files exist:

* :func:`load_decathlon` reads the Medical Segmentation Decathlon layout (``dataset.json``,
  ``imagesTr/``, ``labelsTr/``, ``imagesTs/`` and, when present, ``labelsTs/``);
* :func:`load_csv` reads a table of image / label paths, relative to the table.

:class:`SegmentationDataset` loads one case into ``image`` ``(C, D, H, W)`` float32 and
``label`` ``(D, H, W)`` int64 tensors, in the voxel order of the file (no reorientation: the
affine is returned unchanged). It checks the files (shapes, affines, finite voxels, integer
labels inside the declared classes), selects one modality of a 4D image, binarises labels
(the MRI paper's whole tumour), normalises intensities (min-max to [0, 1] as in the paper, or
z-score inside the brain), crops / pads to a size the U-Net accepts (divisible by 8) and,
optionally, augments. :func:`uncrop` maps a prediction back to the file's grid and
:func:`save_nifti` writes it with the input's affine.

Bad input raises :class:`DataError` naming the file.

>>> cases = load_decathlon("data/tumour", split="train")            # doctest: +SKIP
>>> data = SegmentationDataset(cases, classes=4, binarise=True)     # doctest: +SKIP
>>> item = data[0]; item["image"].shape                             # doctest: +SKIP
torch.Size([1, 56, 64, 48])
>>> save_nifti(uncrop(pred, item["crop"]), "pred.nii.gz", item["affine"])  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset

from dwp._io import atomic_write

from .model import SIZE_DIVISOR

__all__ = [
    "AFFINE_ATOL",
    "Augmentation",
    "Case",
    "CropPad",
    "DataError",
    "SegmentationDataset",
    "collate",
    "decathlon_labels",
    "load_csv",
    "load_decathlon",
    "save_nifti",
    "uncrop",
]

#: Largest difference (mm) between two affines still counted as the same grid: NIfTI
#: stores affines in float32, so files written by different tools differ by ~1e-5 mm.
AFFINE_ATOL = 1e-3

Normalise = Literal["minmax", "zscore"]
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


@dataclass(frozen=True)
class Augmentation:
    """Random augmentation (MONAI transforms); ``SegmentationDataset(augment=True)`` uses
    these defaults.

    Attributes
    ----------
    flip_prob : float
        Probability of flipping each spatial axis (image and label together).
    rotate_prob : float
        Probability of a small rotation (image bilinear, label nearest neighbour).
    max_rotation_deg : float
        Rotation angles are uniform in ``[-max, max]`` degrees about each axis.
    intensity_prob : float
        Probability of each of the intensity scaling and shift (image only).
    scale : float
        Intensities are multiplied by ``1 + u``, ``u`` uniform in ``[-scale, scale]``.
    shift : float
        Then shifted by ``u`` uniform in ``[-shift, shift]`` (images are in [0, 1] after
        min-max scaling).
    """

    flip_prob: float = 0.5
    rotate_prob: float = 0.2
    max_rotation_deg: float = 10.0
    intensity_prob: float = 0.5
    scale: float = 0.1
    shift: float = 0.1


# ---------------------------------------------------------------------------------------------
# Case lists


def _case_id(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
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
        cases.append(Case(_case_id(image), image.resolve(), label and label.resolve()))
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
        cid = row.get(id_col) or _case_id(image)
        cases.append(Case(cid, image, label, mask))
    return cases


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
    """A DataError naming ``path`` unless its grid (shape, affine) is the image's ``ref``."""
    if shape != ref_shape:
        raise DataError(
            f"{path}: {what} shape {shape} differs from the image's {ref_shape} ({ref})"
        )
    if not np.allclose(affine, ref_affine, rtol=0, atol=AFFINE_ATOL):
        raise DataError(
            f"{path}: {what} affine differs from the image's ({ref}), by up to "
            f"{np.abs(affine - ref_affine).max():.3g} mm:\n{affine}\nvs\n{ref_affine}"
        )


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
# Dataset


def _target_size(size: int | Sequence[int] | None) -> tuple[int, int, int] | None:
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


def _build_augmentation(config: Augmentation) -> Any:
    # MONAI is an optional dependency: import it only when augmentation is asked for.
    from monai import transforms as mt

    keys = ["image", "label"]
    angle = np.deg2rad(config.max_rotation_deg)
    return mt.Compose(
        [
            *(mt.RandFlipd(keys, prob=config.flip_prob, spatial_axis=a) for a in range(3)),
            mt.RandRotated(
                keys,
                range_x=angle,
                range_y=angle,
                range_z=angle,
                prob=config.rotate_prob,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
                keep_size=True,
            ),
            mt.RandScaleIntensityd("image", factors=config.scale, prob=config.intensity_prob),
            mt.RandShiftIntensityd("image", offsets=config.shift, prob=config.intensity_prob),
        ]
    )


class SegmentationDataset(Dataset):
    """Cases loaded as U-Net inputs: checked, normalised, cropped / padded, maybe augmented.

    Parameters
    ----------
    cases : sequence of Case
        From :func:`load_decathlon` or :func:`load_csv`.
    normalise : {"minmax", "zscore", None}
        Per channel: ``"minmax"`` scales to [0, 1] (the MRI paper); ``"zscore"`` to mean 0,
        standard deviation 1 inside the brain (the case's mask, else the voxels > 0), and 0
        outside; ``None`` keeps the file's intensities.
    modality : int, optional
        For 4D images ``(D, H, W, C)``: keep channel ``modality`` only (the paper used one).
        ``None`` keeps every channel. A 3D image has the single modality 0.
    binarise : bool
        Map labels > 0 to 1 (the paper's whole tumour); done after the class check.
    classes : int, optional
        Number of classes declared for the label files (``len(decathlon_labels(root))``):
        labels must lie in ``[0, classes)``. ``None`` only requires non-negative integers.
    size : int or 3 ints, optional
        Spatial size after a centred crop / pad (each divisible by 8). ``None`` pads each axis
        to the next multiple of 8 (the U-Net's requirement), so sizes differ between cases of
        different shapes.
    augment : bool or Augmentation
        Random flips, small rotations and intensity changes (MONAI); off by default, as in the
        paper. ``True`` uses :class:`Augmentation`'s defaults.
    seed : int
        Augmentation seed. Item ``i`` of epoch ``e`` (see :meth:`set_epoch`) is drawn from
        ``(seed, e, i)`` only, so it does not depend on the order of loading or on
        DataLoader workers.
    cache : bool
        Keep the preprocessed (not augmented) arrays in memory: for small datasets, loaded
        for many epochs. Each DataLoader worker process has its own cache.

    Notes
    -----
    An item is a dict:

    * ``image``: float32 tensor ``(C, D, H, W)``;
    * ``label``: int64 tensor ``(D, H, W)``, or ``None`` for unlabelled cases;
    * ``affine``: float64 array ``(4, 4)``, the file's (it belongs to ``original_shape``:
      :func:`uncrop` a prediction before :func:`save_nifti`);
    * ``id``: the case id; ``original_shape``: the file's spatial shape;
    * ``crop``: the :class:`CropPad` record for :func:`uncrop`.

    Batch items with :func:`collate` (``DataLoader(..., collate_fn=collate)``).

    Raises
    ------
    DataError
        When an item is loaded, naming the file: unreadable file, image / label / mask
        shape or affine mismatch, non-finite image voxels, non-integer labels or labels
        outside the classes, a modality out of range; at construction, no cases.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        normalise: Normalise | None = "minmax",
        modality: int | None = None,
        binarise: bool = False,
        classes: int | None = None,
        size: int | Sequence[int] | None = None,
        augment: bool | Augmentation = False,
        seed: int = 0,
        cache: bool = False,
    ) -> None:
        if not cases:
            raise DataError("no cases to load (empty split)")
        if normalise not in ("minmax", "zscore", None):
            raise ValueError(f"normalise must be 'minmax', 'zscore' or None, got {normalise!r}")
        if classes is not None and (isinstance(classes, bool) or classes < 1):
            raise ValueError(f"classes must be a positive int or None, got {classes!r}")
        if modality is not None and (isinstance(modality, bool) or modality < 0):
            raise ValueError(f"modality must be a non-negative int or None, got {modality!r}")
        self.cases = list(cases)
        self.normalise = normalise
        self.modality = modality
        self.binarise = binarise
        self.classes = classes
        self.size = _target_size(size)
        self.augmentation = Augmentation() if augment is True else (augment or None)
        self.seed = int(seed)
        self.epoch = 0
        self.cache = cache
        self._cache: dict[int, dict[str, Any]] = {}
        self._augment = _build_augmentation(self.augmentation) if self.augmentation else None

    def __len__(self) -> int:
        return len(self.cases)

    def set_epoch(self, epoch: int) -> None:
        """Draw a new augmentation of every item (call once per epoch)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.cache and index in self._cache:
            item = self._cache[index]
        else:
            item = self._preprocess(self.cases[index])
            if self.cache:
                self._cache[index] = item
        # Copies, so that neither augmentation nor the caller can change the cache.
        image = torch.tensor(item["image"])
        label = None if item["label"] is None else torch.tensor(item["label"])
        if self._augment is not None:
            image, label = self._augmented(index, image, label)
        return {
            "image": image,
            "label": label,
            "affine": item["affine"].copy(),
            "id": self.cases[index].id,
            "original_shape": item["crop"].original_shape,
            "crop": item["crop"],
        }

    def _augmented(
        self, index: int, image: torch.Tensor, label: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        self._augment.set_random_state(seed=int(rng.integers(2**31)))
        # An unlabelled case still gets the same draws: a zero label stands in for it.
        lab = torch.zeros(image.shape[1:]) if label is None else label.float()
        out = self._augment({"image": image, "label": lab[None]})
        # MONAI returns MetaTensors; plain tensors keep the item easy to batch and save.
        image = out["image"].as_subclass(torch.Tensor).float().contiguous()
        if label is not None:
            label = out["label"][0].as_subclass(torch.Tensor).round().long().contiguous()
        return image, label

    def _preprocess(self, case: Case) -> dict[str, Any]:
        """The deterministic part: read, check, select, binarise, normalise, crop / pad."""
        data, affine = _load(case.image)
        data = _squeeze_trailing(data) if data.ndim > 4 else data
        if data.ndim not in (3, 4):
            raise DataError(f"{case.image}: expected a 3D or 4D image, got shape {data.shape}")
        image = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)  # (C, D, H, W)
        if self.modality is not None:
            if self.modality >= image.shape[0]:
                raise DataError(
                    f"{case.image}: modality {self.modality} out of range, the image has "
                    f"{image.shape[0]} (shape {data.shape})"
                )
            image = image[self.modality : self.modality + 1]
        image = np.asarray(image, dtype=np.float32)
        if not np.isfinite(image).all():
            count = int((~np.isfinite(image)).sum())
            raise DataError(f"{case.image}: {count} non-finite (NaN or inf) voxels")
        spatial = image.shape[1:]

        label = None
        if case.label is not None:
            raw, label_affine = _load(case.label)
            raw = _squeeze_trailing(raw)
            _check_grid(case.label, raw.shape, label_affine, case.image, spatial, affine, "label")
            label = _check_labels(case.label, raw, self.classes)
            if self.binarise:
                label = (label > 0).astype(np.int64)

        mask = None
        if case.mask is not None and self.normalise == "zscore":
            raw, mask_affine = _load(case.mask)
            raw = _squeeze_trailing(raw)
            _check_grid(case.mask, raw.shape, mask_affine, case.image, spatial, affine, "mask")
            mask = raw != 0

        if self.normalise == "minmax":
            image = _minmax(image)
        elif self.normalise == "zscore":
            image = _zscore(case.image, image, mask)

        target = self.size or tuple(-(-n // SIZE_DIVISOR) * SIZE_DIVISOR for n in spatial)
        record = _crop_pad(spatial, target)
        image = _place(image, record.shape, record.offset)
        if label is not None:
            label = _place(label, record.shape, record.offset)
        return {"image": image, "label": label, "affine": affine, "crop": record}


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch :class:`SegmentationDataset` items: ``image`` ``(B, C, D, H, W)``, ``label``
    ``(B, D, H, W)`` (``None`` if any item has none); every other key becomes a list.

    Raises
    ------
    DataError
        Items of different shapes (pass ``size=`` to the dataset to make them equal).
    """
    shapes = {tuple(item["image"].shape) for item in items}
    if len(shapes) > 1:
        ids = [item["id"] for item in items]
        raise DataError(
            f"cannot batch cases {ids} of different shapes {sorted(shapes)}; give the dataset "
            "a common size=(D, H, W)"
        )
    labels = [item["label"] for item in items]
    batch = {k: [item[k] for item in items] for k in items[0] if k not in ("image", "label")}
    batch["image"] = torch.stack([item["image"] for item in items])
    batch["label"] = None if any(x is None for x in labels) else torch.stack(labels)
    return batch


# ---------------------------------------------------------------------------------------------
# Writing


def save_nifti(
    array: Any, path: PathLike, affine: Any, header: nib.Nifti1Header | None = None
) -> Path:
    """Write an array as NIfTI, atomically (readers never see a half-written file).

    Parameters
    ----------
    array : numpy.ndarray or torch.Tensor
        ``(D, H, W)`` (or ``(D, H, W, ...)``) on the grid of ``affine``: :func:`uncrop` a
        network output first. Booleans are written as uint8 and 64-bit integers as the
        smallest of uint8 / int16 / int32 holding them (NIfTI readers rarely accept int64).
    path : path
        Ends in ``.nii.gz`` (gzip-compressed) or ``.nii``.
    affine : array-like (4, 4)
        Voxel-to-world matrix, e.g. the ``"affine"`` of a dataset item; stored as both the
        sform and the qform.
    header : nibabel.Nifti1Header, optional
        Header to copy (e.g. the input image's ``nib.load(case.image).header``): units,
        descriptions, codes. Its data type and intensity scaling are replaced by the array's.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{path}: a NIfTI path ends in .nii or .nii.gz")
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype.kind in "iu" and array.dtype.itemsize == 8:
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for dtype in (np.uint8, np.int16, np.int32):
            if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
                array = array.astype(dtype)
                break
        else:
            raise ValueError(f"{path}: integer values [{low}, {high}] do not fit in int32")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4 x 4, got shape {affine.shape}")
    header = header.copy() if header is not None else None
    image = nib.Nifti1Image(array, affine, header)
    image.header.set_data_dtype(array.dtype)
    # The input's scaling would rescale the prediction on reading: write values as they are.
    image.header.set_slope_inter(1.0, 0.0)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    if header is None:
        image.header.set_xyzt_units("mm")
    data = image.to_bytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    with atomic_write(path) as f:
        f.write(data)
    return path

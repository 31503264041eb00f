"""The segmentation dataset of :class:`unet3d.UNet3D`: cases loaded as network inputs.

:class:`SegmentationDataset` loads a list of :class:`Case` records (from
:func:`load_decathlon`, :func:`load_csv` or :func:`cases_from_patterns`,
:mod:`unet3d.cases`) into ``image``
``(C, D, H, W)`` float32 and ``label`` ``(D, H, W)`` int64 tensors, preprocessed by
:func:`unet3d.preprocess.preprocess` (checked, maybe resampled, normalised, cropped /
padded), optionally cached, cut into random patches and augmented; :func:`collate` batches
its items.  A prediction goes back to the file's grid with :func:`uncrop` (or, after
spatial steps, the item's ``spatial`` record, :class:`unet3d.spatial.SpatialRecord`) and
to disk with :func:`save_nifti` (the input's affine).

This module is the data API of ``unet3d``: it also exports the case lists and
:func:`uncrop` / :func:`save_nifti`, so ``from unet3d.data import ...`` gives all of it.

Bad input raises :class:`DataError` naming the file.

>>> cases = load_decathlon("data/tumour", split="train")            # doctest: +SKIP
>>> cases = cases_from_patterns("mine", "{id}_t1.nii.gz", "{id}_seg.nii.gz")  # doctest: +SKIP
>>> data = SegmentationDataset(cases, classes=4, binarise=True)     # doctest: +SKIP
>>> item = data[0]; item["image"].shape                             # doctest: +SKIP
torch.Size([1, 56, 64, 48])
>>> save_nifti(uncrop(pred, item["crop"]), "pred.nii.gz", item["affine"])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from nifti_io import save_nifti

from .cases import Case, DataError, cases_from_patterns, decathlon_labels, load_csv, load_decathlon
from .config import Augmentation, check_label_map, check_modality, check_patch
from .preprocess import AFFINE_ATOL, CropPad, Normalise, preprocess, target_size, uncrop
from .spatial import Spatial, SpatialRecord

__all__ = [
    "AFFINE_ATOL",
    "Augmentation",
    "Case",
    "CropPad",
    "DataError",
    "Normalise",
    "SegmentationDataset",
    "Spatial",
    "SpatialRecord",
    "base_dataset",
    "cases_from_patterns",
    "check_augmentation",
    "collate",
    "decathlon_labels",
    "load_csv",
    "load_decathlon",
    "save_nifti",
    "uncrop",
]


# ---------------------------------------------------------------------------------------------
# Dataset


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


def _build_patches(patch: tuple[int, int, int], pos_fraction: float) -> Any:
    from monai import transforms as mt

    return mt.RandCropByPosNegLabeld(
        ["image", "label"],
        label_key="label",
        spatial_size=patch,
        pos=pos_fraction,
        neg=1.0 - pos_fraction,
        num_samples=1,
    )


class SegmentationDataset(Dataset):
    """Cases loaded as U-Net inputs: checked, resampled, normalised, cropped / padded, maybe
    cut into patches and augmented.

    Parameters
    ----------
    cases : sequence of Case
        From :func:`load_decathlon`, :func:`load_csv` or :func:`cases_from_patterns`.
    normalise : {"minmax", "zscore", None}
        Per channel: ``"minmax"`` scales to [0, 1] (the MRI paper); ``"zscore"`` to mean 0,
        standard deviation 1 inside the brain (the case's mask, else the voxels > 0), and 0
        outside; ``None`` keeps the file's intensities.
    modality : int or sequence of int, optional
        For 4D images ``(D, H, W, C)``: keep channel ``modality`` only (the paper used one),
        or the channels listed, in that order (``(0, 2)``).  ``None`` keeps every channel.
        A 3D image has the single modality 0.
    binarise : bool
        Map labels > 0 to 1 (the paper's whole tumour); done after the class check and
        ``label_map``.
    label_map : mapping of int to int, optional
        Labels through this table after the class check, the values it leaves out
        becoming 0: ``{1: 1, 2: 1, 4: 1}`` is BraTS's whole tumour, ``{1: 1, 4: 1}`` its
        tumour core.
    classes : int, optional
        Number of classes declared for the label files (``len(decathlon_labels(root))``):
        labels must lie in ``[0, classes)``. ``None`` only requires non-negative integers.
    spatial : Spatial, optional
        Reorient, crop to the foreground and resample each case on load (:mod:`unet3d.spatial`),
        before the crop / pad; ``None`` keeps the file's grid.
    size : int or 3 ints, optional
        Spatial size after a centred crop / pad (each divisible by 8). ``None`` pads each axis
        to the next multiple of 8 (the U-Net's requirement), and to at least ``patch_size``,
        so sizes differ between cases of different shapes.
    patch_size : int or 3 ints, optional
        Items are random patches of this size (multiples of 8, at least 16) of the
        preprocessed (and cached) volumes, drawn from ``(seed, epoch, item)`` only, before
        augmentation; ``None``: whole volumes.
    pos_fraction : float
        The share of patches centred on a foreground (label > 0) voxel, the others on a
        background one (MONAI's ``RandCropByPosNegLabeld``, ``pos = pos_fraction``,
        ``neg = 1 - pos_fraction``); a patch near the border is shifted inside the volume.
    patches_per_volume : int
        Patches per volume and epoch: item ``i`` is a patch of case
        ``i // patches_per_volume``.
    augment : bool or Augmentation
        Random flips, small rotations and intensity changes (MONAI); off by default, as in the
        paper. ``True`` uses :class:`Augmentation`'s defaults (the class is
        :class:`unet3d.config.Augmentation`, exported here too).
    seed : int
        Augmentation and patch seed. Item ``i`` of epoch ``e`` (see :meth:`set_epoch`) is
        drawn from ``(seed, e, i)`` only, so it does not depend on the order of loading or
        on DataLoader workers.
    cache : bool
        Keep the preprocessed (whole, not augmented) arrays in memory: for small datasets,
        loaded for many epochs. Each DataLoader worker process has its own cache.

    Notes
    -----
    An item is a dict:

    * ``image``: float32 tensor ``(C, D, H, W)``;
    * ``label``: int64 tensor ``(D, H, W)``, or ``None`` for unlabelled cases;
    * ``affine``: float64 array ``(4, 4)``, the file's (it belongs to ``original_shape``:
      :func:`uncrop` a prediction before :func:`save_nifti`);
    * ``id``: the case id; ``original_shape``: the file's spatial shape;
    * ``crop``: the :class:`CropPad` record for :func:`uncrop` (of the grid after the
      spatial steps, the file's without them);
    * ``spatial``: ``None`` without spatial steps, else the :class:`SpatialRecord` whose
      :meth:`~SpatialRecord.to_file_grid` maps a whole-volume prediction onto the file's
      grid (``uncrop`` included).

    Batch items with :func:`collate` (``DataLoader(..., collate_fn=collate)``).

    Raises
    ------
    DataError
        When an item is loaded, naming the file: unreadable file, image / label / mask
        spacing, shape or affine mismatch, non-finite image voxels, non-integer labels or
        labels outside the classes, a modality out of range, a patch cut from an unlabelled
        case; at construction, no cases.
    ValueError
        At construction, a bad option, naming it.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        normalise: Normalise | None = "minmax",
        modality: int | Sequence[int] | None = None,
        binarise: bool = False,
        classes: int | None = None,
        size: int | Sequence[int] | None = None,
        augment: bool | Augmentation = False,
        seed: int = 0,
        cache: bool = False,
        *,
        label_map: dict[int, int] | None = None,
        spatial: Spatial | None = None,
        patch_size: int | Sequence[int] | None = None,
        pos_fraction: float = 0.5,
        patches_per_volume: int = 1,
    ) -> None:
        if not cases:
            raise DataError("no cases to load (empty split)")
        if normalise not in ("minmax", "zscore", None):
            raise ValueError(f"normalise must be 'minmax', 'zscore' or None, got {normalise!r}")
        if classes is not None and (isinstance(classes, bool) or classes < 1):
            raise ValueError(f"classes must be a positive int or None, got {classes!r}")
        check_modality(modality)
        if not 0 <= pos_fraction <= 1:
            raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction!r}")
        if isinstance(patches_per_volume, bool) or patches_per_volume < 1:
            raise ValueError(f"patches_per_volume must be an int >= 1, got {patches_per_volume!r}")
        self.cases = list(cases)
        self.normalise = normalise
        self.modality = modality
        self.binarise = binarise
        self.classes = classes
        self.size = target_size(size)
        self.label_map = check_label_map(label_map)
        self.spatial = spatial or Spatial()
        self.patch_size = check_patch(patch_size)
        if (
            self.patch_size
            and self.size
            and any(p > s for p, s in zip(self.patch_size, self.size, strict=True))
        ):
            raise ValueError(f"patch_size {self.patch_size} exceeds size {self.size}")
        if self.patch_size is None and patches_per_volume != 1:
            raise ValueError("patches_per_volume needs patch_size (whole volumes: one each)")
        self.pos_fraction = float(pos_fraction)
        self.patches_per_volume = int(patches_per_volume)
        self.augmentation = Augmentation() if augment is True else (augment or None)
        self.seed = int(seed)
        self.epoch = 0
        self.cache = cache
        self._cache: dict[int, dict[str, Any]] = {}
        self._augment = _build_augmentation(self.augmentation) if self.augmentation else None
        self._patch = _build_patches(self.patch_size, pos_fraction) if self.patch_size else None

    def __len__(self) -> int:
        return len(self.cases) * self.patches_per_volume

    def set_epoch(self, epoch: int) -> None:
        """Draw a new augmentation and new patches of every item (call once per epoch)."""
        self.epoch = int(epoch)

    def _load(self, case: int) -> dict[str, Any]:
        if self.cache and case in self._cache:
            return self._cache[case]
        item = preprocess(
            self.cases[case],
            normalise=self.normalise,
            modality=self.modality,
            binarise=self.binarise,
            classes=self.classes,
            size=self.size,
            label_map=self.label_map,
            spatial=self.spatial,
            min_size=self.patch_size,
        )
        if self.cache:
            self._cache[case] = item
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"item {index} of a dataset of {len(self)}")
        index %= len(self)
        case = index // self.patches_per_volume
        item = self._load(case)
        if self._patch is not None:  # a patch of views of the cache, copied
            image, label = self._patched(index, item["image"], item["label"])
        else:  # copies, so that neither augmentation nor the caller can change the cache
            image = torch.tensor(item["image"])
            label = None if item["label"] is None else torch.tensor(item["label"])
        if self._augment is not None:
            image, label = self._augmented(index, image, label)
        return {
            "image": image,
            "label": label,
            "affine": item["affine"].copy(),
            "id": self.cases[case].id,
            "original_shape": item["original_shape"],
            "crop": item["crop"],
            "spatial": item["spatial"],
        }

    def _patched(
        self, index: int, image: np.ndarray, label: np.ndarray | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A random patch (fresh tensors) of the whole volume ``image`` ``(C, D, H, W)`` and
        ``label`` ``(D, H, W)``: its centre drawn from ``(seed, epoch, index)`` (a stream of
        its own: the augmentation's draws are those without patches)."""
        if label is None:
            raise DataError(
                f"{self.cases[index // self.patches_per_volume].image}: no label to draw "
                "training patches from (patch_size=, --patch-size)"
            )
        rng = np.random.default_rng([self.seed, self.epoch, index, 1])
        self._patch.set_random_state(seed=int(rng.integers(2**31)))
        volumes = {"image": torch.from_numpy(image), "label": torch.from_numpy(label[None])}
        (out,) = self._patch(volumes)
        fresh = torch.contiguous_format  # a copy even where the crop is a contiguous view
        return (
            out["image"].as_subclass(torch.Tensor).clone(memory_format=fresh),
            out["label"][0].as_subclass(torch.Tensor).clone(memory_format=fresh),
        )

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


def base_dataset(dataset: Dataset) -> Dataset:
    """``dataset`` without its :class:`~torch.utils.data.Subset` wrappers: the dataset that
    loads (and maybe augments) the items, whose :meth:`SegmentationDataset.set_epoch` a
    training loop calls."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def check_augmentation(dataset: Dataset, augmentation: Augmentation | None, name: str) -> None:
    """Check that a ready ``dataset`` augments with ``augmentation`` (``None``: not at all).

    Only a :class:`SegmentationDataset` (maybe in :class:`~torch.utils.data.Subset`
    wrappers) augments; any other dataset counts as not augmenting.  A training loop that
    records ``augmentation`` as its setting calls this before using a dataset it did not
    build, so that the record cannot differ from what the data do.

    Parameters
    ----------
    dataset
        The dataset to check.
    augmentation
        What it must do: :class:`Augmentation`, or ``None`` (validation data).
    name
        What the dataset is, for the message (``"training"``, ``"validation"``).

    Raises
    ------
    ValueError
        The dataset augments otherwise, naming both augmentations.
    """
    own = getattr(base_dataset(dataset), "augmentation", None)
    if own != augmentation:
        raise ValueError(
            f"the {name} dataset augments with {own}, the config asks for {augmentation}: "
            "a ready dataset is used as it is (validation data never augmented); build it "
            "with SegmentationDataset(augment=config.augmentation, seed=config.seed) for "
            "training, without augment= for validation, or pass Case lists"
        )


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch :class:`SegmentationDataset` items: ``image`` ``(B, C, D, H, W)``, ``label``
    ``(B, D, H, W)`` (``None`` if any item has none); every other key becomes a list.

    Raises
    ------
    DataError
        Items of different shapes (pass ``size=`` to the dataset to make them equal).
    """
    shapes = {tuple(item["image"].shape) for item in items}
    channels = {shape[0] for shape in shapes}
    if len(channels) > 1:  # 3D and 4D images mixed: no size= can fix that
        ids = [item["id"] for item in items]
        raise DataError(
            f"cannot batch cases {ids}: their images have {sorted(channels)} channels (3D and "
            "4D images mixed?); give every image the same channels, or keep one with "
            "modality=K (--modality K)"
        )
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

"""The benchmark's data: subjects of the synthetic :mod:`cohorts`, generated in memory at
4 mm (2 mm for one ablation), cropped to the region a section needs and intensity-normalised."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

import cohorts
import regression3d as r3d

from .config import AGE_CROP, LESION_CROP, LESION_SCALING, RESOLUTION, Preset

__all__ = ["Cohort", "age_cohorts", "lesion_cohorts", "load_cohort", "scale_crop"]


@dataclass
class Cohort:
    """Cropped images ``(N, 1, D, H, W)``, brain masks, targets and ageing labels."""

    x: Tensor
    mask: Tensor
    targets: dict[str, np.ndarray]
    labels: np.ndarray
    affine: np.ndarray


def _crop_affine(affine: np.ndarray, crop: tuple[slice, ...]) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in crop]
    return affine @ shift


def scale_crop(crop: tuple[slice, ...], resolution: int) -> tuple[slice, ...]:
    """``crop``, given on the :data:`~benchmarks.regression.config.RESOLUTION` grid, on the
    grid of ``resolution`` mm (the same region of the template)."""
    factor = RESOLUTION // resolution
    if factor * resolution != RESOLUTION:
        raise ValueError(f"resolution must divide {RESOLUTION} mm, got {resolution}")
    return tuple(slice(s.start * factor, s.stop * factor) for s in crop)


def load_cohort(
    name: str, n: int, split: str, seed: int, crop: tuple[slice, ...], scaling: str,
    resolution: int = RESOLUTION,
) -> Cohort:  # fmt: skip
    """``n`` subjects of a cohort in memory, cropped and intensity-normalised.

    ``crop`` is given on the :data:`~benchmarks.regression.config.RESOLUTION` grid and
    scaled to ``resolution`` (:func:`scale_crop`).

    ``scaling``: ``"zscore"`` inside the brain (brain age), ``"minmax"`` to [0, 1], or
    ``"background"`` (lesion count): ``(x - median) / (q99 - median)`` per image, clipped at
    0, so the white-matter background is 0 and only brighter structures (the FLAIR-like
    lesions) are non-zero; Hydranet's zero images are then background images.
    """
    crop = scale_crop(crop, resolution)
    images, masks, labels, targets = [], [], [], {}
    for i in range(n):
        s = cohorts.subject(name, i, resolution=resolution, seed=seed, split=split)
        brain = sum(s["tissues"].values()) > 0.5
        images.append(s["image"][crop])
        masks.append(brain[crop])
        labels.append(s["label"][crop])
        # ms_source is a segmentation cohort, but its subjects carry count and volume too
        keys = cohorts.COHORTS[name].targets or ("count", "volume_mm3")
        for key in keys:
            value = s["meta"][key]
            targets.setdefault(key, []).append(
                1.0 if value == "F" else 0.0 if value == "M" else value
            )
    x = torch.from_numpy(np.stack(images)).float().unsqueeze(1)
    mask = torch.from_numpy(np.stack(masks)).unsqueeze(1)
    if scaling == "zscore":
        x = r3d.standardise_images(x, mask) * mask
    elif scaling == "background":
        flat = x.flatten(1)
        median = flat.median(1).values.view(-1, 1, 1, 1, 1)
        high = flat.quantile(0.99, dim=1).view(-1, 1, 1, 1, 1)
        x = ((x - median) / (high - median).clamp_min(1e-8)).clamp_min(0)
    else:
        low = x.amin(dim=(2, 3, 4), keepdim=True)
        high = x.amax(dim=(2, 3, 4), keepdim=True)
        x = (x - low) / (high - low).clamp_min(1e-8)
    affine = _crop_affine(np.asarray(s["affine"]), crop)
    return Cohort(
        x, mask[:, 0], {k: np.asarray(v) for k, v in targets.items()}, np.stack(labels), affine
    )


# The runs of one process share their cohorts (they are deterministic from the seed): a
# serial run generates each once, as before runs were split.  Callers must not modify them.
@lru_cache(maxsize=2)
def age_cohorts(preset: Preset, seed: int) -> tuple[Cohort, Cohort]:
    """The ``brain_age`` training and test subjects of sections (a) and (c)."""
    return (
        load_cohort("brain_age", preset.age_train, "train", seed, AGE_CROP, "zscore"),
        load_cohort("brain_age", preset.age_test, "test", seed, AGE_CROP, "zscore"),
    )


@lru_cache(maxsize=2)
def lesion_cohorts(
    preset: Preset, seed: int, resolution: int = RESOLUTION
) -> tuple[Cohort, Cohort]:
    """The ``lesion_count`` training pool and test subjects of section (b) (at
    ``resolution`` mm: the same subjects and lesion counts, rendered on a finer grid)."""
    return tuple(
        load_cohort(
            "lesion_count", n, split, seed, LESION_CROP, LESION_SCALING, resolution=resolution
        )
        for n, split in ((max(preset.lesion_sizes), "train"), (preset.lesion_test, "test"))
    )  # type: ignore[return-value]

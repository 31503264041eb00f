"""The five cohorts, and one subject generated in memory.

A subject is a pure function of ``(cohort, split, index, resolution, seed)``: its random
numbers come from ``numpy.random.SeedSequence([seed, cohort id, split, index])``, so subject
``i`` is the same whatever the cohort's size and can be generated (or resumed) on its own.
The sequence is split into independent streams for the anatomy (lesions, age), the
deformation and the rendering, so that overriding one (a fixed age, no deformation) leaves
the others unchanged.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from cohorts import ageing, deform, lesions, render
from cohorts.anatomy import Anatomy, check_resolution, load_anatomy

__all__ = [
    "COHORTS",
    "SPLITS",
    "TUMOUR_COHORTS",
    "Cohort",
    "check_cohort",
    "subject",
    "subject_id",
]

SPLITS: dict[str, int] = {"train": 0, "test": 1}


@dataclass(frozen=True)
class Cohort:
    """What a cohort is: its task, contrast, labels, regression targets and lesions.

    Attributes
    ----------
    name : str
        The key in :data:`COHORTS`.
    description : str
        One line for ``dataset.json`` and ``--help``.
    task : str
        ``"segmentation"`` (Decathlon layout) or ``"regression"`` (CSV table).
    contrast : str
        Key of :data:`cohorts.render.CONTRASTS`.
    modality : str
        Name written in ``dataset.json``.
    labels : dict
        Label value (as str) to name; empty when no label maps are written.
    targets : tuple of str
        Regression columns of the subject table.
    lesion : str
        What is drawn into the anatomy: ``"scattered"`` (small white-matter lesions, label 1),
        ``"tumour"`` (one tumour, labels 1 core, 2 enhancing rim, 3 oedema, and a
        ``whole_tumour`` map) or ``""`` (none).
    """

    name: str
    description: str
    task: str
    contrast: str
    modality: str
    labels: dict[str, str] = field(default_factory=dict)
    targets: tuple[str, ...] = ()
    lesion: str = ""


_TUMOUR_LABELS = {"0": "background", "1": "core", "2": "enhancing rim", "3": "oedema"}

COHORTS: dict[str, Cohort] = {
    c.name: c
    for c in (
        Cohort(
            "ms_source",
            "Source domain, MS-like: FLAIR-like contrast, 5-20 small hyperintense lesions in "
            "deep and periventricular white matter",
            "segmentation",
            "flair",
            "FLAIR",
            {"0": "background", "1": "lesion"},
            lesion="scattered",
        ),
        Cohort(
            "tumour_target",
            "Target domain, tumour-like: T2-like contrast, one large lesion with necrotic core, "
            "enhancing rim and oedema",
            "segmentation",
            "t2",
            "T2",
            dict(_TUMOUR_LABELS),
            lesion="tumour",
        ),
        Cohort(
            "tumour_t1",
            "Far-transfer target, tumour-like: T1-like contrast (tumour darker than the tissue "
            "around it, CSF dark), one large lesion with necrotic core, rim and oedema",
            "segmentation",
            "t1_tumour",
            "T1",
            dict(_TUMOUR_LABELS),
            lesion="tumour",
        ),
        Cohort(
            "brain_age",
            "Brain age 18-90: ventricle enlargement and cortical thinning with age, a slightly "
            "larger brain for males; T1-like contrast",
            "regression",
            "t1",
            "T1",
            {"0": "background", "1": "ventricles", "2": "cortical ribbon"},
            ("age", "sex"),
        ),
        Cohort(
            "lesion_count",
            "Lesion count and total volume (additive targets): 0-12 small FLAIR-hyperintense "
            "white-matter lesions",
            "regression",
            "flair",
            "FLAIR",
            {"0": "background", "1": "lesion"},
            ("count", "volume_mm3"),
            lesion="scattered",
        ),
    )
}

#: The cohorts with one tumour: ``whole_tumour`` labels apply to them.
TUMOUR_COHORTS: tuple[str, ...] = tuple(c.name for c in COHORTS.values() if c.lesion == "tumour")


def check_cohort(cohort: str) -> Cohort:
    """Return the :class:`Cohort` named ``cohort``.

    Raises
    ------
    ValueError
        Naming the known cohorts.
    """
    if cohort not in COHORTS:
        raise ValueError(f"unknown cohort {cohort!r}; known cohorts: {', '.join(COHORTS)}")
    return COHORTS[cohort]


def subject_id(cohort: str, split: str, index: int) -> str:
    """File stem of a subject, e.g. ``ms_source_tr0003``."""
    return f"{cohort}_{'tr' if split == 'train' else 'ts'}{index:04d}"


def _streams(cohort: str, split: str, index: int, seed: int) -> list[np.random.Generator]:
    # crc32 is stable across processes and Python versions (hash() is salted).
    key = zlib.crc32(cohort.encode())
    sequence = np.random.SeedSequence([int(seed), key, SPLITS[split], int(index)])
    return [np.random.default_rng(s) for s in sequence.spawn(3)]


def _ms_lesions(rng: np.random.Generator, anatomy: Anatomy) -> list[lesions.Ellipsoid]:
    res = anatomy.resolution
    n = int(rng.integers(5, 21))
    n_peri = int(rng.binomial(n, 0.5))
    peri = (anatomy.wm > 0.5) & (anatomy.ventricle_distance > 0) & (anatomy.ventricle_distance <= 8)
    deep = (anatomy.wm > 0.85) & (anatomy.depth > 15) & (anatomy.ventricle_distance > 8)
    radius = (max(2.5, 1.5 * res), max(6.0, 2.5 * res))
    placed = lesions.place_ellipsoids(rng, anatomy, peri, n_peri, radius, gap_mm=res)
    more = lesions.place_ellipsoids(rng, anatomy, deep, n - n_peri, radius, gap_mm=res)
    return placed + more


def _count_lesions(rng: np.random.Generator, anatomy: Anatomy) -> list[lesions.Ellipsoid]:
    res = anatomy.resolution
    n = int(rng.integers(0, 13))
    where = (anatomy.wm > 0.7) & (anatomy.depth > 12)
    radius = (max(2.5, 1.5 * res), max(7.0, 2.5 * res))
    # A gap of two voxels plus the deformation's slack keeps every lesion its own component.
    return lesions.place_ellipsoids(rng, anatomy, where, n, radius, gap_mm=2 * res + 3.0)


def _tumour(rng: np.random.Generator, anatomy: Anatomy) -> tuple[dict[str, np.ndarray], dict]:
    res = anatomy.resolution
    r = rng.uniform(18.0, 30.0)
    where = (anatomy.wm > 0.5) & (anatomy.depth > 0.6 * r + 8) & (anatomy.ventricle_distance > 8)
    (ellipsoid,) = lesions.place_ellipsoids(rng, anatomy, where, 1, (r, r), elongation=(0.7, 1.0))
    rim_outer = rng.uniform(0.5, 0.65)
    core = rim_outer * rng.uniform(0.55, 0.8)
    box, q = lesions.radius_field(anatomy.shape, res, ellipsoid)
    # Irregular borders: the tumour's radius varies smoothly by about +-15% around it.
    wobble = deform.smooth_noise(rng, q.shape, res, 12.0, 0.08)[0]
    q = q / (1.0 + wobble)
    scale = min(ellipsoid.radii)
    cumulative = {}
    for name, edge in (("core", core), ("rim", rim_outer), ("oedema", 1.0)):
        full = np.zeros(anatomy.shape, dtype=np.float32)
        full[box] = lesions.ramp((edge - q) * scale, res)
        cumulative[name] = full * anatomy.mask  # nothing outside the brain
    meta = {
        "centre_index": list(ellipsoid.centre_index(res)),
        "radii_mm": [round(x, 3) for x in ellipsoid.radii],
    }
    return cumulative, meta


def subject(
    cohort: str,
    index: int = 0,
    resolution: float = 2,
    seed: int = 0,
    *,
    split: str = "train",
    age: float | None = None,
    sex: str | None = None,
    deformed: bool = True,
) -> dict[str, Any]:
    """Generate one subject in memory.

    Parameters
    ----------
    cohort : str
        A key of :data:`COHORTS`.
    index : int
        Subject number within its split.
    resolution : float
        Voxel size in mm (1, 2, 3 or 4).
    seed : int
        Cohort seed.
    split : str
        ``"train"`` or ``"test"``: two independent streams of subjects.
    age, sex : optional
        ``brain_age`` only: override the drawn age (years) or sex (``"F"`` / ``"M"``); the
        deformation and noise stay those of the subject, which isolates the effect.
    deformed : bool
        False skips the random affine / elastic deformation (the anatomy stays on the
        template grid, so drawn lesion centres can be checked directly).

    Returns
    -------
    dict
        ``id``; ``image`` (``float32``, X, Y, Z); ``label`` (``uint8``; for ``brain_age``
        the subject's ageing map, 1 ventricles, 2 cortical ribbon); ``affine``
        (4x4); ``tissues`` (warped ``csf``, ``gm``, ``wm`` probabilities); ``meta`` (JSON-able:
        targets, lesion centres in template voxels, ...). The tumour cohorts
        (:data:`TUMOUR_COHORTS`) also give ``whole_tumour`` (``uint8`` binarisation).
    """
    spec = check_cohort(cohort)
    res = check_resolution(resolution)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if int(index) != index or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    if (age is not None or sex is not None) and cohort != "brain_age":
        raise ValueError("age and sex can only be set for the 'brain_age' cohort")
    if sex is not None and sex not in ("F", "M"):
        raise ValueError(f"sex must be 'F' or 'M', got {sex!r}")
    anatomy = load_anatomy(res)
    rng_anatomy, rng_deform, rng_render = _streams(cohort, split, int(index), seed)
    meta: dict[str, Any] = {"cohort": cohort, "split": split, "index": int(index)}
    tissues = {"csf": anatomy.csf, "gm": anatomy.gm, "wm": anatomy.wm}
    extra: dict[str, np.ndarray] = {}  # lesion channels, warped with the tissues
    global_scale = 1.0

    if spec.lesion == "scattered":
        drawn = (
            _ms_lesions(rng_anatomy, anatomy)
            if cohort == "ms_source"
            else _count_lesions(rng_anatomy, anatomy)
        )
        lesion = np.zeros(anatomy.shape, dtype=np.float32)
        for e in drawn:
            np.maximum(lesion, lesions.draw(anatomy.shape, res, e), out=lesion)
        extra["lesion"] = lesion * anatomy.mask
        meta["lesion_centres"] = [list(e.centre_index(res)) for e in drawn]
        meta["drawn_count"] = len(drawn)
    elif spec.lesion == "tumour":
        extra, meta["tumour"] = _tumour(rng_anatomy, anatomy)
    elif cohort == "brain_age":
        drawn_age = float(np.round(rng_anatomy.uniform(*ageing.AGE_RANGE), 1))
        drawn_sex = "M" if rng_anatomy.integers(2) else "F"
        meta["age"] = float(drawn_age if age is None else age)
        meta["sex"] = drawn_sex if sex is None else sex
        tissues = ageing.age_tissues(anatomy, meta["age"])
        global_scale = ageing.MALE_SCALE if meta["sex"] == "M" else 1.0

    grid = deform.random_grid(
        rng_deform, anatomy.shape, res, global_scale=global_scale, enabled=deformed
    )
    channels = {**tissues, **extra}
    warped = dict(zip(channels, deform.warp(np.stack(list(channels.values())), grid), strict=True))
    probabilities = {k: warped[k] for k in tissues}
    out: dict[str, Any] = {"id": subject_id(cohort, split, int(index)), "affine": anatomy.affine}

    if spec.lesion == "scattered":
        label = (warped["lesion"] >= 0.5).astype(np.uint8)
        keep = 1.0 - warped["lesion"]
        probabilities = {k: v * keep for k, v in probabilities.items()}
        probabilities["lesion"] = warped["lesion"]
        _, count = ndimage.label(label)
        meta["count"] = int(count)
        meta["volume_mm3"] = float(label.sum() * anatomy.voxel_volume)
    elif spec.lesion == "tumour":
        core, rim, whole = warped["core"], warped["rim"], warped["oedema"]
        label = np.zeros(anatomy.shape, dtype=np.uint8)
        # Nested thresholds of the cumulative maps keep core inside rim inside oedema.
        label[whole >= 0.5] = 3
        label[rim >= 0.5] = 2
        label[core >= 0.5] = 1
        keep = 1.0 - whole
        probabilities = {k: v * keep for k, v in probabilities.items()}
        probabilities.update(core=core, rim=rim - core, oedema=whole - rim)
        out["whole_tumour"] = (label > 0).astype(np.uint8)
        meta["volume_mm3"] = {
            name: float((label == value).sum() * anatomy.voxel_volume)
            for value, name in ((1, "core"), (2, "rim"), (3, "oedema"))
        }
    else:  # brain_age: the label is the subject's own ageing map
        where = ageing.ageing_map(anatomy).astype(np.float32)[None]
        label = deform.warp(where, grid, mode="nearest")[0].astype(np.uint8)

    out["image"] = render.render(rng_render, probabilities, spec.contrast, res)
    out["label"] = label
    out["tissues"] = {k: warped[k] for k in ("csf", "gm", "wm")}
    out["meta"] = meta
    return out

"""Stage 1: the data, the offline cohorts (the source, and the target of the preset's
regime: :data:`~.config.REGIMES`) or the user's Decathlon folders."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unet3d.data import Case, load_decathlon

from .config import REGIMES, Preset


@dataclass
class Data:
    """Cases of every role, and the description that goes into the stage hashes."""

    source_train: list[Case]
    source_val: list[Case]
    pool: list[Case]
    val: list[Case]
    test: list[Case]
    key: dict[str, Any]


def _split_cases(cases: list[Case], counts: Sequence[int], root: Path) -> list[list[Case]]:
    if sum(counts) > len(cases):
        raise ValueError(f"{root}: {len(cases)} training cases, the preset needs {sum(counts)}")
    out, start = [], 0
    for n in counts:
        out.append(cases[start : start + n])
        start += n
    return out


def data_spec(cohort: str, preset: Preset, seed: int, folder: Path | None) -> dict[str, Any]:
    """What identifies a data set in the stage hashes: the generator's settings for a
    generated cohort (the same on every machine), the resolved folder for the user's own."""
    if folder is not None:
        return {"folder": str(Path(folder).resolve())}
    return {"cohort": cohort, "resolution": preset.resolution, "seed": seed}


def data_key(
    preset: Preset, seed: int, source_data: Path | None = None, target_data: Path | None = None
) -> dict[str, Any]:
    """The source and target data specs (:func:`data_spec`), computed without any file."""
    return {
        "source": data_spec("ms_source", preset, seed, source_data),
        "target": data_spec(REGIMES[preset.regime], preset, seed, target_data),
    }


def prepare_data(
    preset: Preset,
    work: Path,
    seed: int,
    source_data: Path | None = None,
    target_data: Path | None = None,
    progress: bool = True,
    jobs: int = 1,
) -> Data:
    """Stage 1: generate (or reuse) the cohorts, or list the user's Decathlon folders.

    ``jobs``: subjects generated at a time (:func:`cohorts.generate`); the files, and so
    the stage's key (:func:`data_key`), do not depend on it."""
    import cohorts

    def generated(cohort: str, n_train: int, n_test: int, **options: Any) -> Path:
        folder = work / "data" / f"{cohort}-{preset.resolution}mm-seed{seed}"
        cohorts.generate(
            cohort,
            folder,
            n_train=n_train,
            n_test=n_test,
            resolution=preset.resolution,
            seed=seed,
            progress=progress,
            jobs=jobs,
            **options,
        )
        return folder

    key = data_key(preset, seed, source_data, target_data)
    if source_data is None:
        source_data = generated("ms_source", preset.n_source + preset.n_source_val, 0)
    if target_data is None:
        target_data = generated(
            REGIMES[preset.regime], preset.pool + preset.n_val, preset.n_test, whole_tumour=True
        )
    src_train, src_val = _split_cases(
        load_decathlon(source_data), (preset.n_source, preset.n_source_val), source_data
    )
    pool, val = _split_cases(load_decathlon(target_data), (preset.pool, preset.n_val), target_data)
    test = load_decathlon(target_data, split="test")
    if len(test) < preset.n_test:
        raise ValueError(f"{target_data}: {len(test)} test cases, the preset needs {preset.n_test}")
    test = test[: preset.n_test]
    unlabelled = [c.image for c in test if c.label is None]
    if unlabelled:
        raise ValueError(f"{target_data}: test image {unlabelled[0]} has no label in labelsTs/")
    return Data(src_train, src_val, pool, val, test, key)

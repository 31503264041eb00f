"""Write a cohort to disk: the Decathlon layout, or a CSV table for regression.

Layout of ``out_dir``::

    cohort.json          the generator's configuration and its hash (what is cached)
    dataset.json         segmentation cohorts: Medical Segmentation Decathlon index
    subjects.csv         regression cohorts: id, split, image, label, targets
    imagesTr/ imagesTs/  float32 NIfTI images, <id>.nii.gz
    labelsTr/ labelsTs/  uint8 label maps (test labels too, for evaluation)
    ageing_map.nii.gz    brain_age only: where ageing acts, in template space
    .subjects/<id>.json  per-subject metadata, written last: the subject is complete

Every file is written to a temporary name and moved into place (:func:`dwp.io.atomic_write`,
through :func:`nifti_io.save_nifti` for the images), so an interrupted run leaves only
complete files; running again skips the finished subjects and produces the same bytes as
an uninterrupted run.  A run killed mid-write may leave a temporary file behind; a later
run removes those not written to for an hour (:func:`dwp.io.clean_stale_temporaries`),
never the fresh one of another process writing into the same folder, and rewrites no
index file whose content has not changed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cohorts import ageing
from cohorts.anatomy import check_resolution, load_anatomy
from cohorts.subjects import TUMOUR_COHORTS, check_cohort, subject, subject_id
from dwp.io import clean_stale_temporaries, write_json, write_text
from nifti_io import save_nifti

__all__ = ["GENERATOR_VERSION", "generate"]

#: Bump when a change to the generator changes its output, to invalidate caches.
GENERATOR_VERSION = 1

#: gzip level of the images: noisy float images barely compress further, and level 9 is
#: several times slower.
COMPRESSLEVEL = 1

CITATION = (
    "Anatomy: MNI ICBM 2009 template (Fonov et al., NeuroImage 2011 and NeuroImage 2009; "
    "Collins et al. 1999), as shipped with nilearn. Copyright (C) 1993-2009 Louis Collins, "
    "McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University."
)


def _save_nifti(array: np.ndarray, path: Path, affine: np.ndarray) -> None:
    # nifti_io writes gzip without a time stamp: same array, same bytes
    save_nifti(array, path, affine, compresslevel=COMPRESSLEVEL)


def _check_counts(n_train: int, n_test: int) -> None:
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if n_train + n_test == 0:
        raise ValueError("n_train + n_test must be at least 1 (got zero subjects)")


def _config(cohort: str, resolution: int, seed: int) -> dict[str, Any]:
    config = {
        "cohort": cohort,
        "resolution_mm": resolution,
        "seed": int(seed),
        "generator_version": GENERATOR_VERSION,
    }
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return {**config, "config_hash": digest[:16]}


def _check_folder(out: Path, config: dict[str, Any], overwrite: bool) -> bool:
    """Return whether finished subjects can be reused."""
    manifest = out / "cohort.json"
    if manifest.exists():
        previous = json.loads(manifest.read_text())
        if previous.get("config_hash") == config["config_hash"]:
            return not overwrite
        if not overwrite:
            diff = {k: (previous.get(k), v) for k, v in config.items() if previous.get(k) != v}
            raise ValueError(
                f"out_dir {str(out)!r} holds a cohort made with another configuration "
                f"(differences, old -> new: {diff}); pass overwrite=True (--overwrite) to "
                "regenerate it, or choose another out_dir"
            )
        return False
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"out_dir {str(out)!r} exists, is not empty and is not a cohort folder; choose "
            "another out_dir or pass overwrite=True (--overwrite)"
        )
    return False


def _json(obj: dict[str, Any]) -> str:
    # the text write_json(path, obj, indent=2) writes
    return json.dumps(obj, indent=2) + "\n"


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` unless the file already holds exactly it: a run reusing a
    finished folder then rewrites none of its index files, which other processes may be
    reading or writing."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    write_text(path, text)


def _jobs(cohort: str, n_train: int, n_test: int) -> Iterator[tuple[str, int]]:
    yield from (("train", i) for i in range(n_train))
    yield from (("test", i) for i in range(n_test))


def _paths(cohort: str, split: str, index: int) -> dict[str, str]:
    sid = subject_id(cohort, split, index)
    suffix = "Tr" if split == "train" else "Ts"
    return {
        "id": sid,
        "image": f"images{suffix}/{sid}.nii.gz",
        "label": f"labels{suffix}/{sid}.nii.gz",
        "meta": f".subjects/{sid}.json",
    }


def _write_subject(out: Path, record: dict[str, Any], paths: dict[str, str], labels: str) -> None:
    """Write one subject's files; the metadata goes last and marks the subject complete."""
    label = record["whole_tumour"] if labels == "whole" else record["label"]
    _save_nifti(record["image"], out / paths["image"], record["affine"])
    _save_nifti(label, out / paths["label"], record["affine"])
    write_json(out / paths["meta"], record["meta"], indent=2)


def _check_jobs(jobs: int) -> int:
    if isinstance(jobs, bool) or not isinstance(jobs, (int, np.integer)) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    return int(jobs)


def _make_subject(
    out: Path, cohort: str, split: str, index: int, res: int, seed: int, labels: str
) -> dict[str, Any]:
    """Generate one subject and write its files; returns its metadata.  Module level and
    with picklable arguments: the worker processes of :func:`generate` run it too."""
    record = subject(cohort, index, res, seed, split=split)
    _write_subject(out, record, _paths(cohort, split, index), labels)
    meta: dict[str, Any] = record["meta"]
    return meta


def _init_worker() -> None:
    # One torch thread a worker: the workers already use the cores, and with one thread
    # ATen runs no OpenMP parallel region, which a forked child of a process that already
    # ran one deadlocks in (GNU OpenMP is not fork-safe; seen here: without this line, the
    # workers hang once the parent has run grid_sample on 2 threads).  A subject's bytes do
    # not depend on the thread count (grid_sample computes each voxel on its own).
    torch.set_num_threads(1)


def _pool(workers: int) -> ProcessPoolExecutor:
    # fork on Linux: a worker starts in milliseconds with the parent's imports and its
    # cached anatomy (load_anatomy: seconds at 2 mm), where spawn or forkserver would import
    # torch and SciPy and load the anatomy again in every worker.  It is safe here: the
    # workers run torch single-threaded (_init_worker) and use no CUDA.  spawn elsewhere
    # (macOS and Windows, where fork is unsafe or missing).
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context(method), initializer=_init_worker
    )


def generate(
    cohort: str,
    out_dir: str | os.PathLike[str],
    n_train: int,
    n_test: int = 0,
    resolution: float = 2,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    whole_tumour: bool = False,
    jobs: int = 1,
) -> Path:
    """Generate a synthetic cohort on the MNI152 anatomy, or finish an interrupted one.

    Parameters
    ----------
    cohort : str
        ``"ms_source"``, ``"tumour_target"``, ``"tumour_t1"``, ``"brain_age"`` or
        ``"lesion_count"``.
    out_dir : path
        Folder to write (created if needed).
    n_train, n_test : int
        Subjects per split; at least one in all. Subject ``i`` does not depend on them, so a
        cohort can be grown later with the same seed.
    resolution : float
        Voxel size in mm: 4 (tests), 2 (default) or 1 (the template's own; also 3).
    seed : int
        Cohort seed; same seed, same files, bit for bit.
    overwrite : bool
        Regenerate every subject, also when ``out_dir`` holds another configuration.
    progress : bool
        Show a progress bar.
    whole_tumour : bool
        Tumour cohorts (``tumour_target``, ``tumour_t1``) only: write binary whole-tumour
        labels instead of 1 core, 2 enhancing rim, 3 oedema.
    jobs : int
        Subjects generated at a time, in worker processes; the files are the same bit for
        bit whatever the number.  1 (default): one after the other, in this process.

    Returns
    -------
    pathlib.Path
        ``dataset.json`` (segmentation cohorts) or ``subjects.csv`` (regression cohorts).

    Raises
    ------
    ValueError
        Unknown cohort, zero subjects, an unsupported resolution, ``whole_tumour`` for another
        cohort, ``jobs`` not an integer >= 1, or an ``out_dir`` holding something else.
    """
    spec = check_cohort(cohort)
    res = check_resolution(resolution)
    _check_counts(n_train, n_test)
    jobs = _check_jobs(jobs)
    tumour = cohort in TUMOUR_COHORTS
    if whole_tumour and not tumour:
        names = " and ".join(repr(name) for name in TUMOUR_COHORTS)
        raise ValueError(f"whole_tumour=True applies to the {names} cohorts only")
    out = Path(out_dir)
    config = _config(cohort, res, seed)
    labels = "whole" if whole_tumour else "multi"
    if tumour:  # the label choice is part of a tumour cohort's configuration
        config = {**config, "labels": labels}
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
        config["config_hash"] = digest[:16]
    reuse = _check_folder(out, config, overwrite)
    for folder in (".", "imagesTr", "labelsTr", "imagesTs", "labelsTs", ".subjects"):
        (out / folder).mkdir(parents=True, exist_ok=True)
        # Temporary files of a run killed mid-write; only old ones: another process may be
        # writing into this folder right now, and removing its temporary file fails its write.
        clean_stale_temporaries(out / folder)
    _write_if_changed(out / "cohort.json", _json({**config, "citation": CITATION}))

    anatomy = load_anatomy(res)
    if cohort == "brain_age":
        _save_nifti(ageing.ageing_map(anatomy), out / "ageing_map.nii.gz", anatomy.affine)
    todo = list(_jobs(cohort, int(n_train), int(n_test)))
    paths_of = [_paths(cohort, split, index) for split, index in todo]
    # The subjects' metadata in the order of todo, whichever subject finishes first: the
    # index files are the same as a serial run's.
    metas: list[dict[str, Any]] = [{} for _ in todo]
    pending = []
    with tqdm(total=len(todo), desc=cohort, unit="subject", disable=not progress) as bar:
        for i, ((split, index), paths) in enumerate(zip(todo, paths_of, strict=True)):
            done = reuse and all((out / paths[k]).exists() for k in ("image", "label", "meta"))
            if done:
                metas[i] = json.loads((out / paths["meta"]).read_text())
            elif jobs == 1:
                metas[i] = _make_subject(out, cohort, split, index, res, seed, labels)
            else:
                pending.append(i)
                continue
            bar.update()
        if pending:
            with _pool(min(jobs, len(pending))) as pool:
                futures = {
                    pool.submit(_make_subject, out, cohort, *todo[i], res, seed, labels): i
                    for i in pending
                }
                try:
                    for future in as_completed(futures):
                        metas[futures[future]] = future.result()
                        bar.update()
                except BaseException:
                    # A failed subject, or an interruption: start no other one.  The
                    # finished subjects stay; a later run resumes from them.
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    rows = [(split, p, meta) for (split, _), p, meta in zip(todo, paths_of, metas, strict=True)]

    if spec.task == "segmentation":
        label_names = {"0": "background", "1": "tumour"} if whole_tumour else spec.labels
        index_file = out / "dataset.json"
        dataset = {
            "name": cohort,
            "description": spec.description,
            "reference": CITATION,
            "licence": "synthetic data on the MNI ICBM152 template (see reference)",
            "tensorImageSize": "3D",
            "modality": {"0": spec.modality},
            "labels": label_names,
            "numTraining": int(n_train),
            "numTest": int(n_test),
            "training": [
                {"image": f"./{p['image']}", "label": f"./{p['label']}"}
                for split, p, _ in rows
                if split == "train"
            ],
            # The Decathlon lists test images only; their labels are in labelsTs/.
            "test": [f"./{p['image']}" for split, p, _ in rows if split == "test"],
            "generator": config,
        }
        _write_if_changed(index_file, _json(dataset))
        return index_file

    index_file = out / "subjects.csv"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "split", "image", "label", *spec.targets])
    for split, p, meta in rows:
        writer.writerow([p["id"], split, p["image"], p["label"], *(meta[t] for t in spec.targets)])
    _write_if_changed(index_file, buffer.getvalue())
    return index_file

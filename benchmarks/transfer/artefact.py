"""The committed source artefact: a preset's source and prior stages, slimmed to the files
the target runs read, so that a fresh clone starts the grid from source nets that learned
something instead of training them first.

An artefact is a folder ``benchmarks/artefacts/transfer-<seed>-<hash>/`` holding the two
stage folders exactly as :mod:`benchmarks.stages` names them (``source-<hash>/``,
``prior-<hash>/``: each with its ``config.json``, the stage's key, and its summary) and a
``manifest.json`` with the SHA-256 of every file.  :func:`locate` finds the artefact of a
configuration by those folder names and :func:`verify` checks it before use: a folder
whose ``config.json`` does not hash to its name (the artefact was made for another
configuration, or edited) or a file whose checksum differs is an :class:`ArtefactError`
naming it.  Regenerate one (the stages are deterministic on a CPU for a given thread
count, so bit for bit) with::

    python -m benchmarks.transfer.make_artefact --preset quick --seed 0 --threads 2
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dwp.io import write_json

from ..stages import digest, stage_folder
from .config import PRIOR, SOURCE, Preset
from .keys import stage_key

#: Where the committed artefacts live.
ARTEFACTS = Path(__file__).resolve().parents[1] / "artefacts"
MANIFEST = "manifest.json"
#: The files of each stage a target run reads (the kernel sets stay in the work folder:
#: only the prior stage reads them, and its result is in the artefact).
KEEP = {
    SOURCE: ("config.json", "sources.json", "net0/best.pt"),
    PRIOR: ("config.json", "prior.json", "prior.pt", "kernel_gaussian.pt", "swag.pt"),
}
#: How to make an artefact again, for the error messages.
COMMAND = "python -m benchmarks.transfer.make_artefact --preset {preset} --seed {seed} --threads 2"


class ArtefactError(ValueError):
    """A committed artefact does not match its configuration or its checksums."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stage_keys(preset: Preset, seed: int, data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The keys of the two stages an artefact holds."""
    return {stage: stage_key(preset, stage, seed, data) for stage in (SOURCE, PRIOR)}


def artefact_name(preset: Preset, seed: int, data: Mapping[str, Any]) -> str:
    """``transfer-<seed>-<hash of both stage keys>``."""
    return f"transfer-{seed}-{digest(stage_keys(preset, seed, data))}"


def verify(folder: Path) -> dict[str, Any]:
    """Check an artefact against its manifest; returns the manifest.

    Raises
    ------
    ArtefactError
        A stage folder whose ``config.json`` does not hash to the folder's name, a file
        missing or changed (its SHA-256 differs from the manifest's), or no manifest.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files, stages = manifest["files"], manifest["stages"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ArtefactError(
            f"{manifest_path}: not a readable artefact manifest ({error})"
        ) from error
    redo = COMMAND.format(preset=manifest.get("preset", "<preset>"), seed=manifest.get("seed", 0))
    for stage_dir in stages.values():
        config = folder / stage_dir / "config.json"
        try:
            key = json.loads(config.read_text())
        except (OSError, ValueError) as error:
            raise ArtefactError(f"{config}: unreadable ({error}); regenerate: {redo}") from error
        name = f"{key.get('stage')}-{digest(key)}"
        if name != stage_dir:
            raise ArtefactError(
                f"{config}: this configuration hashes to {name}, not to the folder's name "
                f"{stage_dir}: the artefact was made for another configuration or edited; "
                f"regenerate it: {redo}"
            )
    for relative, expected in files.items():
        path = folder / relative
        if not path.is_file():
            raise ArtefactError(f"{path}: missing from the artefact; regenerate it: {redo}")
        actual = _sha256(path)
        if actual != expected:
            raise ArtefactError(
                f"{path}: SHA-256 {actual[:16]}... does not match the manifest's "
                f"{expected[:16]}...; regenerate the artefact: {redo}"
            )
    return manifest


def locate(
    preset: Preset, seed: int, data: Mapping[str, Any], root: Path | None = None
) -> Path | None:
    """The verified artefact of this configuration under ``root`` (default
    :data:`ARTEFACTS`), or ``None``.

    Only the generated source cohort has an artefact (a user's ``--source-data`` never
    matches one)."""
    folder = Path(ARTEFACTS if root is None else root) / artefact_name(preset, seed, data)
    if not (folder / MANIFEST).exists():
        return None
    verify(folder)
    return folder


def export(
    preset: Preset,
    seed: int,
    data: Mapping[str, Any],
    work: Path,
    root: Path = ARTEFACTS,
    *,
    preset_name: str = "quick",
    threads: int | None = None,
) -> Path:
    """Copy the finished source and prior stages of ``work`` into an artefact under
    ``root`` (written beside it, then renamed into place); returns its folder."""
    keys = stage_keys(preset, seed, data)
    target = Path(root) / artefact_name(preset, seed, data)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".export-") as tmp:
        staging = Path(tmp) / target.name
        stages, files = {}, {}
        for stage, key in keys.items():
            source = stage_folder(Path(work), stage, key, create=False)
            stages[stage] = source.name
            for name in KEEP[stage]:
                path = source / name
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: run the {stage} stage first")
                (staging / source.name / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, staging / source.name / name)
                files[f"{source.name}/{name}"] = _sha256(path)
        write_json(
            staging / MANIFEST,
            {
                "preset": preset_name,
                "seed": seed,
                "stages": stages,
                "files": files,
                "torch": torch.__version__,
                "threads": threads,
                "command": COMMAND.format(preset=preset_name, seed=seed),
            },
        )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


#: Summary entries that measure the machine, not the result: a regeneration may differ
#: there (:func:`differences` leaves them out).
TIMINGS = ("seconds",)


#: The training checkpoints of an artefact: they also hold the run's folder and its
#: epochs' durations, so a regeneration is compared on their weights.
CHECKPOINTS = ("best.pt",)


def same_content(a: Path, b: Path) -> bool:
    """Whether two artefact files hold the same result: the same bytes; for a stage
    summary (``.json``) the same entries but :data:`TIMINGS`; for a training checkpoint
    (:data:`CHECKPOINTS`) the same weights, bit for bit."""
    a, b = Path(a), Path(b)
    if a.suffix == ".json":

        def entries(path: Path) -> dict[str, Any]:
            summary = json.loads(path.read_text())
            return {k: v for k, v in summary.items() if k not in TIMINGS}

        return entries(a) == entries(b)
    if a.name in CHECKPOINTS:
        from unet3d.checkpoint import read_state_dict

        first, second = read_state_dict(a), read_state_dict(b)
        return first.keys() == second.keys() and all(
            torch.equal(first[k], second[k]) for k in first
        )
    return a.read_bytes() == b.read_bytes()


def differences(folder: Path, work: Path) -> list[str]:
    """The files of the artefact ``folder`` whose copies in the stage folders of ``work``
    (a regeneration) hold another result (:func:`same_content`)."""
    manifest = verify(folder)
    return [
        relative
        for relative in manifest["files"]
        if not same_content(Path(folder) / relative, Path(work) / relative)
    ]

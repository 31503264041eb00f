"""A content-keyed cache for the stages of a benchmark pipeline.

A stage (train some networks, fit a prior, run one configuration) keeps its outputs in a
folder named by its name and a hash of its key, ``<root>/<stage>-<hash>``, where the key
is a JSON-able description of everything the stage depends on: a changed setting gives
another folder (a stale result is never reused), an unchanged one the same folder (a
finished result is never redone).  The folder holds the key as ``config.json`` and, once
the stage has finished, its summary file; file names in the summary are stored relative
to the folder, so that a work folder can be moved or copied to another machine::

    SOURCE = Stage("source", "sources.json", files=("best",))
    folder, cached = SOURCE.open(work, key)
    if cached is None:
        ...  # compute, writing into folder
        cached = SOURCE.finish(folder, {"best": str(folder / "best.pt"), ...})
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dwp.io import clean_stale_temporaries, write_json

__all__ = ["Stage", "digest", "located", "logger", "stage_folder"]


def digest(key: Any) -> str:
    """A short hash of a JSON-able ``key`` (dict order does not matter)."""
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def stage_folder(root: Path, stage: str, key: Mapping[str, Any], create: bool = True) -> Path:
    """``root / "<stage>-<hash of key>"``; when ``create``, the folder is made and the key
    written to its ``config.json`` (if it is not there yet)."""
    folder = Path(root) / f"{stage}-{digest(key)}"
    if create:
        folder.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(folder)  # an interrupted stage's orphan writes
        if not (folder / "config.json").exists():
            write_json(folder / "config.json", dict(key), default=str)
    return folder


def located(summary: Any, folder: Path, files: Iterable[str], inverse: bool = False) -> Any:
    """``summary`` with the entries named in ``files`` (file names, lists of them or
    ``None``, at any depth) joined to ``folder``, or made relative to it when ``inverse``."""
    files = tuple(files)

    def convert(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, list):
            return [convert(v) for v in value]
        return str(Path(value).relative_to(folder) if inverse else folder / value)

    if isinstance(summary, list):
        return [located(v, folder, files, inverse) for v in summary]
    if not isinstance(summary, dict):
        return summary
    return {
        k: convert(v) if k in files else located(v, folder, files, inverse)
        for k, v in summary.items()
    }


@dataclass(frozen=True)
class Stage:
    """One cached stage: its ``name`` (the folder prefix), the ``summary`` file that marks
    it finished, and the summary entries that hold file names (``files``)."""

    name: str
    summary: str
    files: tuple[str, ...] = ()

    def folder(self, root: Path, key: Mapping[str, Any], create: bool = True) -> Path:
        """The stage's folder under ``root`` for ``key`` (see :func:`stage_folder`)."""
        return stage_folder(root, self.name, key, create)

    def read(self, folder: Path) -> dict[str, Any] | None:
        """The finished summary in ``folder`` with absolute file names, or ``None``."""
        done = Path(folder) / self.summary
        if not done.exists():
            return None
        return located(json.loads(done.read_text()), Path(folder), self.files)

    def open(self, root: Path, key: Mapping[str, Any]) -> tuple[Path, dict[str, Any] | None]:
        """The stage's folder (created, with its ``config.json``) and its finished summary,
        or ``None`` when the stage has not finished."""
        folder = self.folder(root, key, create=False)
        cached = self.read(folder)
        if cached is None:
            self.folder(root, key)
        return folder, cached

    def finish(self, folder: Path, summary: dict[str, Any]) -> dict[str, Any]:
        """Write ``summary`` (file names relative to ``folder``) as the finished mark."""
        relative = located(summary, folder, self.files, inverse=True)
        write_json(folder / self.summary, relative, default=str)
        return summary

    def find(self, roots: Iterable[Path], key: Mapping[str, Any]) -> dict[str, Any] | None:
        """The finished summary for ``key`` from the first of ``roots`` that has one."""
        for root in roots:
            cached = self.read(self.folder(root, key, create=False))
            if cached is not None:
                return cached
        return None


def logger(name: str) -> Callable[[str], None]:
    """A function that prints ``[name] message`` to stderr without breaking progress bars."""
    from tqdm.auto import tqdm

    def log(message: str) -> None:
        tqdm.write(f"[{name}] {message}", file=sys.stderr)

    return log

"""A fingerprint of the data a training run uses, and what differs between two of them.

``unet3d train`` stores the fingerprint of its cases in ``config.json`` (``"data"``) and
``--resume`` refuses to continue a run on other data (:func:`data_changes`).  It holds

* ``source``: the command-line options that chose the cases (``--data``,
  ``--image-pattern``, ``--label-pattern``, ``--csv``, ``--split``, ``--val-data``,
  ``--val-csv``, ``--val-split``, ``--val-fraction``), paths resolved, so that another
  folder or split is named as such;
* ``train`` / ``val``: per case its id and, per file (image, label, mask), its size and a
  digest of its content (:func:`file_digest`).

Why content and not modification times: copying or restoring a data set (``cp``, ``rsync``
without ``-t``, a container volume, ``git checkout``) changes every ``mtime`` and none of
the data, and a resume refused for that would have no way around it.  Hashing every byte
would be exact, but it reads the whole data set at every start (gigabytes for full
resolution MRI).  :func:`file_digest` reads at most about 3 MiB of a file: the whole file
up to 4 MiB, otherwise its first and last MiB (the NIfTI header: shape, affine, data
type; for ``.nii.gz`` the gzip trailer, a CRC-32 and the length of the *whole*
uncompressed volume, so any edit of a compressed volume shows) and 64 evenly spaced
16 KiB blocks (for uncompressed ``.nii``, where a same-size edit could otherwise hide in
the middle: an edited label region spans many blocks' worth of slices).  A same-size edit
of an uncompressed volume of more than 4 MiB that misses every sampled block goes
unnoticed; that is the price of a quick check.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .cases import Case

__all__ = [
    "FINGERPRINT_VERSION",
    "data_changes",
    "data_fingerprint",
    "file_digest",
    "stored_fingerprint",
]

PathLike = str | os.PathLike

#: Version of the fingerprint's layout and digest; another version is not compared.
FINGERPRINT_VERSION = 1

_WHOLE = 4 << 20  # files up to this size are hashed whole
_END = 1 << 20  # otherwise: the first and the last MiB...
_BLOCKS, _BLOCK = 64, 16 << 10  # ...and this many evenly spaced blocks of this size
_ROLES = ("image", "label", "mask")
_SHOWN = 3  # case ids named per list in a message


def file_digest(path: PathLike) -> dict[str, Any]:
    """``{"size": bytes, "digest": hex}`` of a file's content (see the module docstring).

    Raises
    ------
    OSError
        The file cannot be read.
    """
    hasher = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size <= _WHOLE:
            hasher.update(handle.read())
        else:
            step = (size - 2 * _END - _BLOCK) // (_BLOCKS - 1)
            offsets = [0, *(_END + i * step for i in range(_BLOCKS)), size - _END]
            lengths = [_END, *([_BLOCK] * _BLOCKS), _END]
            for offset, length in zip(offsets, lengths, strict=True):
                handle.seek(offset)
                hasher.update(handle.read(length))
    return {"size": size, "digest": hasher.hexdigest()}


def _case(case: Case) -> dict[str, Any]:
    files = {role: getattr(case, role) for role in _ROLES}
    return {
        "id": case.id,
        **{role: file_digest(path) for role, path in files.items() if path is not None},
    }


def data_fingerprint(
    source: Mapping[str, Any],
    train_cases: Sequence[Case],
    val_cases: Sequence[Case] | None,
) -> dict[str, Any]:
    """The fingerprint of a run's data (JSON-ready).

    Parameters
    ----------
    source
        What chose the cases, e.g. ``{"--data": "/abs/folder", "--val-fraction": 0.2}``;
        keys are named in :func:`data_changes`' messages, values must be JSON values.
    train_cases, val_cases
        The cases trained and validated on (``None``: no validation).

    Returns
    -------
    dict
        ``version``, ``source``, ``train`` and ``val`` (lists of ``{"id", "image",
        "label", "mask"}``, each file as :func:`file_digest`; ``val`` may be ``None``).

    Raises
    ------
    OSError
        A case's file cannot be read.
    """
    return {
        "version": FINGERPRINT_VERSION,
        "source": dict(source),
        "train": [_case(c) for c in train_cases],
        "val": None if val_cases is None else [_case(c) for c in val_cases],
    }


def _names(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_SHOWN])
    return shown + (f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else "")


def _count(cases: list | None) -> str:
    return "none" if cases is None else f"{len(cases)} cases"


def _cases_changes(what: str, old: list | None, new: list | None) -> list[str]:
    """Added, removed and changed cases of one list (``what``: "training cases")."""
    if old is None or new is None:
        if old is None and new is None:
            return []
        return [f"{what}: {_count(old)} -> {_count(new)}"]
    before = {c["id"]: c for c in old}
    after = {c["id"]: c for c in new}
    changes = []
    added = [i for i in after if i not in before]
    removed = [i for i in before if i not in after]
    if added:
        changes.append(f"{what} added: {_names(added)}")
    if removed:
        changes.append(f"{what} removed: {_names(removed)}")
    for case_id in (i for i in after if i in before):
        files = [r for r in _ROLES if before[case_id].get(r) != after[case_id].get(r)]
        if files:
            changes.append(f"case {case_id}: {' and '.join(files)} file changed")
    return changes


def data_changes(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between a run's data fingerprint and the current one, one phrase each
    (empty: the same data).

    Parameters
    ----------
    stored, current
        Two :func:`data_fingerprint` results; ``stored`` may come from an older release.

    Returns
    -------
    list of str
        e.g. ``["--val-fraction: 0.25 -> 0.5", "training cases added: case4",
        "case case1: label file changed"]``; a ``stored`` of another fingerprint version
        gives one phrase saying the data cannot be compared.
    """
    if stored.get("version") != current.get("version"):
        return [
            f"data fingerprint version {stored.get('version')!r} -> {current.get('version')!r} "
            "(the data cannot be compared)"
        ]
    old_source, new_source = stored.get("source", {}), current.get("source", {})
    changes = [
        f"{key}: {old_source.get(key)} -> {new_source.get(key)}"
        for key in sorted(old_source.keys() | new_source.keys())
        if old_source.get(key) != new_source.get(key)
    ]
    changes += _cases_changes("training cases", stored.get("train"), current.get("train"))
    changes += _cases_changes("validation cases", stored.get("val"), current.get("val"))
    return changes


def stored_fingerprint(config_json: Path) -> dict[str, Any] | None:
    """The ``"data"`` fingerprint of a run's ``config.json``; ``None`` when the file or
    the entry is missing (a run from before fingerprints were stored).

    Raises
    ------
    ValueError
        ``config.json`` exists but is not a readable JSON object (naming the file).
    """
    if not config_json.is_file():
        return None
    try:
        record = json.loads(config_json.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{config_json}: unreadable ({error}); delete it to resume without checking the data"
        ) from error
    if not isinstance(record, dict):
        raise ValueError(f"{config_json}: not a JSON object; delete it to resume")
    data = record.get("data")
    return data if isinstance(data, dict) else None

"""Files the library writes and reads: atomic writes, torch files, versioned formats.

Every file dwp and the applications built on it write (kernel banks, priors, checkpoints,
reports) goes through :func:`atomic_write`, so a reader never sees half a file; every torch
file they read goes through :func:`load_torch_file`, so a damaged file is an error that
names it; and every versioned one-file format is described by one :class:`FileFormat`, so
"is this the right kind of file, and can this version read it?" is answered the same way
everywhere.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ._version import __version__

__all__ = [
    "FileFormat",
    "LibraryFileError",
    "atomic_write",
    "load_torch_file",
    "save_torch_file",
    "write_json",
    "write_text",
]

PathLike = str | os.PathLike


class LibraryFileError(ValueError):
    """A file is unreadable, of another kind, of an unreadable version, or inconsistent.

    Each file format raises its own subclass (``KernelBankError``, ``PriorFileError``,
    ``unet3d``'s ``CheckpointError``), so callers can catch one kind or all of them.
    The message always starts with the file's path.
    """


def _current_umask() -> int:
    # os.umask can only be read by setting it; restore it at once
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for binary writing; on success flush it to
    disk and rename it over ``path``, on any failure delete it and leave ``path`` as it was.

    The temporary file lives in the same folder because ``os.replace`` is atomic only
    within one file system; the ``fsync`` makes the data, not just the rename, survive a
    crash.  The file gets the permissions a plain ``open()`` would give it (``mkstemp``
    creates owner-only files; results are meant to be shared).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave the temporary file behind
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_write(path) as handle:
        handle.write(text.encode("utf-8"))
    return Path(path)


def write_json(path: PathLike, obj: Any, *, indent: int | None = 1, **options: Any) -> Path:
    """Write ``obj`` as JSON (and a final newline) to ``path`` atomically; ``options`` go
    to :func:`json.dumps` (e.g. ``default=str``)."""
    return write_text(path, json.dumps(obj, indent=indent, **options) + "\n")


def save_torch_file(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically.

    The object is serialised to memory first, so an error while pickling never even
    creates the temporary file.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_write(path) as handle:
        handle.write(buffer.getbuffer())
    return Path(path)


def load_torch_file(
    path: PathLike,
    *,
    what: str = "torch file",
    error: type[LibraryFileError] = LibraryFileError,
    hint: str = "",
) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name the file.

    Parameters
    ----------
    path
        The file.
    what
        What the file should be, for the message (``"prior file"``, ``"checkpoint"``).
    error
        The :class:`LibraryFileError` subclass to raise for a damaged or foreign file.
    hint
        Advice appended to the message (e.g. "save a state dict, not a pickled module").

    Raises
    ------
    FileNotFoundError, IsADirectoryError, PermissionError
        As ``open`` raises them (they already name the path).
    LibraryFileError
        (``error``) The file is truncated, corrupt, or holds a pickled object that is not
        tensors and plain containers; the message names the file and torch's reason.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as exc:  # torch raises many kinds for a truncated or foreign file
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        advice = f" ({hint})" if hint else ""
        raise error(
            f"{path}: cannot read the {what} (truncated or corrupt?){advice}: "
            f"{type(exc).__name__}: {reason}"
        ) from exc


def describe_payload(payload: Any) -> str:
    """What a loaded file holds, in a few words, for an error message."""
    if isinstance(payload, Mapping):
        return f"a dict with keys {sorted(map(str, payload))[:10]}"
    return f"a {type(payload).__name__}"


@dataclass(frozen=True)
class FileFormat:
    """One versioned one-file format: a ``format`` tag, a ``format_version`` and the keys
    a file must hold.

    A file written by :meth:`header` + its own entries carries ``format``,
    ``format_version`` and the ``dwp_version`` that wrote it.  :meth:`check` accepts
    versions ``1 .. version`` (older files stay readable: a format that changes its layout
    bumps ``version`` and keeps reading the old one) and rejects a newer version, another
    tag or missing keys with ``error``, naming the file.

    Parameters
    ----------
    tag
        The ``format`` entry, e.g. ``"dwp.KernelBank"``.
    version
        The version this code writes (and the newest it reads).
    keys
        Entries every file of this format holds besides the header.
    error
        The :class:`LibraryFileError` subclass raised for a bad file.
    what
        The format in words, for messages (``"kernel bank"``).
    """

    tag: str
    version: int
    keys: tuple[str, ...]
    error: type[LibraryFileError]
    what: str

    def header(self) -> dict[str, Any]:
        """The entries that identify a file of this format."""
        return {"format": self.tag, "format_version": self.version, "dwp_version": __version__}

    def check(self, payload: Any, path: PathLike) -> Mapping[str, Any]:
        """``payload`` (a loaded file) if it is a readable file of this format."""
        if not isinstance(payload, Mapping) or payload.get("format") != self.tag:
            raise self.error(
                f"{path}: not a {self.what} file ({self.tag}); it holds {describe_payload(payload)}"
            )
        version = payload.get("format_version")
        if (
            isinstance(version, bool)
            or not isinstance(version, int)
            or not 1 <= version <= self.version
        ):
            raise self.error(
                f"{path}: {self.what} format version {version!r} is not readable by this dwp "
                f"(reads 1 to {self.version}; the file was written by dwp "
                f"{payload.get('dwp_version', '?')}): upgrade dwp to read it"
            )
        missing = [key for key in self.keys if key not in payload]
        if missing:
            raise self.error(f"{path}: {self.what} file misses keys {missing}")
        return payload

    def load(self, path: PathLike) -> Mapping[str, Any]:
        """Read ``path`` with :func:`load_torch_file` and :meth:`check` it."""
        return self.check(load_torch_file(path, what=f"{self.what} file", error=self.error), path)

    def save(self, entries: Mapping[str, Any], path: PathLike) -> Path:
        """Write :meth:`header` and ``entries`` to ``path`` atomically."""
        missing = [key for key in self.keys if key not in entries]
        if missing:
            raise ValueError(f"a {self.what} file needs keys {missing}")
        return save_torch_file({**self.header(), **entries}, path)


def check_plain(value: Any, where: str, allowed: Iterable[type] = ()) -> None:
    """Raise ``TypeError`` unless ``value`` is plain Python data (``None``, ``str``,
    ``int``, ``float``, ``bool`` and lists, tuples, dicts of them, plus ``allowed``
    types), i.e. what ``torch.load(weights_only=True)`` reads back; ``where`` names it."""
    allowed = tuple(allowed)
    if value is None or isinstance(value, (str, int, float, bool, *allowed)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]", allowed)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            check_plain(key, f"{where} key", allowed)
            check_plain(item, f"{where}[{key!r}]", allowed)
        return
    raise TypeError(
        f"{where} holds a {type(value).__name__}; a dwp file stores only plain Python values "
        f"(str, int, float, bool, None, lists, tuples, dicts)"
    )

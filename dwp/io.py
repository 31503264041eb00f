"""Files the library writes and reads: atomic writes, torch files, versioned formats.

Every file dwp and the applications built on it write (kernel banks, priors, checkpoints,
reports) goes through :func:`atomic_write`, so a reader never sees half a file and a
failed write names the file; every torch file they write goes through
:func:`save_torch_file`, which seals it with a checksum of its bytes; every torch file they
read goes through :func:`load_torch_file`, which checks that seal and the loaded values,
so a damaged file is an error that names it; and every versioned one-file format is
described by one :class:`FileFormat`, so "is this the right kind of file, and can this
version read it?" is answered the same way everywhere.

The checksum
------------
A torch file is a zip archive.  Zip readers find an archive from its end record, which
may carry a comment of up to 65535 bytes; ``torch.save`` writes none.
:func:`save_torch_file` writes torch's bytes ``T`` with that comment set to
``dwp.sha256:`` followed by the 64 hex digits of ``sha256(T)`` (the comment-length field
of ``T`` is zero, so the digest covers the file up to that field, then two zero bytes).
The file therefore stays a plain torch file: ``torch.load`` and older dwp versions read it
and ignore the comment.  :func:`load_torch_file` recomputes the digest before unpickling
anything, because torch never checks the CRC-32 its zip records carry (a file with 64
flipped bytes loads).  A file without the seal (written by an earlier dwp, or by plain
``torch.save``) is checked against those CRC-32s instead.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import struct
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ._version import __version__

__all__ = [
    "STALE_AFTER_S",
    "CorruptFileError",
    "FileFormat",
    "LibraryFileError",
    "atomic_write",
    "clean_stale_temporaries",
    "first_non_finite",
    "load_torch_file",
    "save_torch_file",
    "write_json",
    "write_text",
]

PathLike = str | os.PathLike

#: A temporary file of :func:`atomic_write` older than this (seconds since its last write)
#: is an orphan of an interrupted write: a live writer writes its whole file at once, in
#: far less time, so an hour never removes a file that is being written.
STALE_AFTER_S = 3600.0

# mkstemp's names: the prefix and suffix atomic_write passes around 8 random characters
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")

_ZIP_START = b"PK\x03\x04"  # a zip archive's first local file header
_ZIP_END = b"PK\x05\x06"  # its end-of-central-directory record
_END_SIZE = 22  # that record without its comment; the comment length is its last 2 bytes
_SEAL_PREFIX = b"dwp.sha256:"
_SEAL_SIZE = len(_SEAL_PREFIX) + 64
_CHUNK = 1 << 20


class LibraryFileError(ValueError):
    """A file is unreadable, of another kind, of an unreadable version, or inconsistent.

    Each file format raises its own subclass (``KernelBankError``, ``PriorFileError``,
    ``unet3d``'s ``CheckpointError``), so callers can catch one kind or all of them.
    The message always starts with the file's path.
    """


class CorruptFileError(LibraryFileError):
    """A file is damaged: truncated, or its bytes no longer match their checksum.

    :func:`load_torch_file` raises it combined with the format's own error class (a
    corrupt prior file is both a ``PriorFileError`` and a ``CorruptFileError``), so
    callers catching either see it.
    """

    #: the format's error class this one is combined with
    format_error: type[LibraryFileError] = LibraryFileError

    def __reduce__(self) -> tuple[Any, ...]:
        # the combined classes are made at run time, so pickle (e.g. an error sent back by a
        # worker process) cannot find them by name: rebuild from the format's class
        return (_rebuild_corrupt_error, (type(self).format_error, self.args))


@functools.cache
def corrupt_error_class(error: type[LibraryFileError]) -> type[CorruptFileError]:
    """The :class:`CorruptFileError` that is also an ``error`` (one class per format)."""
    if issubclass(error, CorruptFileError):
        return error
    if error is LibraryFileError:
        return CorruptFileError
    name = f"Corrupt{error.__name__}"
    attributes = {"format_error": error, "__module__": __name__, "__qualname__": name}
    return type(name, (CorruptFileError, error), attributes)


def _rebuild_corrupt_error(
    error: type[LibraryFileError], args: tuple[Any, ...]
) -> CorruptFileError:
    return corrupt_error_class(error)(*args)


# ---------------------------------------------------------------------------------------------
# Writing


def _current_umask() -> int:
    # os.umask can only be read by setting it; restore it at once
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` again, saying which file could not be written (errno and class kept)."""
    # without the target, "[Errno 28] No space left on device" names no file, or only the
    # random temporary name
    return OSError(exc.errno, f"could not write {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for binary writing; on success flush it to
    disk and rename it over ``path``, on any failure delete it and leave ``path`` as it was.

    The temporary file lives in the same folder because ``os.replace`` is atomic only
    within one file system; the ``fsync`` makes the data, not just the rename, survive a
    crash.  The file gets the permissions a plain ``open()`` would give it (``mkstemp``
    creates owner-only files; results are meant to be shared).  Its name is
    ``.<name>.<8 random characters>.tmp``: a process killed mid-write leaves it behind,
    and :func:`clean_stale_temporaries` removes it later.

    Raises
    ------
    OSError
        A failed write (a full disk, a missing folder, no permission), with its ``errno``
        and class (``FileNotFoundError``...) kept and ``path`` named in the message; the
        temporary file is removed.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_current_umask())
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # KeyboardInterrupt too: never leave the temporary file behind
        # a failed unlink must not hide why the write failed
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise _naming(exc, path) from exc
        raise


def clean_stale_temporaries(
    folder: PathLike, older_than_s: float = STALE_AFTER_S, *, target: str | None = None
) -> list[Path]:
    """Remove the temporary files interrupted :func:`atomic_write` calls left in ``folder``.

    Only files named like :func:`atomic_write`'s temporaries and not written to for
    ``older_than_s`` seconds are removed: another process writing into the same folder
    right now keeps its temporary file (removing it would make its write fail).
    :func:`save_torch_file` calls it for the file it writes; a program writing other files
    into a folder calls it on the folder when it starts.

    Parameters
    ----------
    folder
        The folder (not its subfolders); a missing folder holds nothing to remove.
    older_than_s
        The age, since the last write, from which a temporary file is an orphan.
    target
        Only the temporaries of this file name (``"last.pt"``); all by default.

    Returns
    -------
    list of pathlib.Path
        The files removed.
    """
    if older_than_s < 0:
        raise ValueError(f"older_than_s must be >= 0, got {older_than_s}")
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    removed = []
    now = time.time()
    for entry in entries:
        if not _TEMPORARY.match(entry.name):
            continue
        if target is not None and entry.name[1 : -len(".12345678.tmp")] != target:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if now - entry.stat(follow_symlinks=False).st_mtime < older_than_s:
                continue
            os.unlink(entry.path)
        except FileNotFoundError:  # renamed by its writer, or removed by another cleaner
            continue
        removed.append(Path(entry.path))
    return removed


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_write(path) as handle:
        handle.write(text.encode("utf-8"))
    return Path(path)


def write_json(path: PathLike, obj: Any, *, indent: int | None = 1, **options: Any) -> Path:
    """Write ``obj`` as JSON (and a final newline) to ``path`` atomically; ``options`` go
    to :func:`json.dumps` (e.g. ``default=str``)."""
    return write_text(path, json.dumps(obj, indent=indent, **options) + "\n")


def _seal(data: memoryview) -> bytes:
    """The bytes that replace the last two of torch's ``data``: the comment length and the
    comment carrying ``data``'s SHA-256 (see the module)."""
    if len(data) < _END_SIZE or data[-_END_SIZE:][:4] != _ZIP_END or data[-2:] != b"\0\0":
        # torch has always written a zip archive without a comment; never write a file
        # that would look corrupt when read back
        raise RuntimeError(
            f"torch {torch.__version__} did not write a zip archive without a comment: "
            "dwp cannot add its checksum to the file"
        )
    digest = hashlib.sha256(data).hexdigest().encode("ascii")
    return struct.pack("<H", _SEAL_SIZE) + _SEAL_PREFIX + digest


def save_torch_file(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically, sealed with the SHA-256 of its bytes.

    The object is serialised to memory first, so an error while pickling never even
    creates the temporary file.  :func:`load_torch_file` checks the seal (the module
    says where it is); ``torch.load`` reads the file as any torch file.  Temporary files
    that earlier, interrupted writes of ``path`` left behind are removed once they are
    old (:func:`clean_stale_temporaries`).
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getbuffer()
    seal = _seal(data)
    with atomic_write(path) as handle:
        handle.write(data[:-2])
        handle.write(seal)
    path = Path(path)
    # tidying up must never fail a write that succeeded
    with contextlib.suppress(OSError):
        clean_stale_temporaries(path.parent, target=path.name)
    return path


# ---------------------------------------------------------------------------------------------
# Reading


def _sealed_digest(handle: BinaryIO, size: int) -> tuple[str, int] | None:
    """The digest a sealed file carries and how many of its bytes it covers before the two
    zero bytes, or ``None`` for a file without the seal."""
    tail_size = _END_SIZE + _SEAL_SIZE
    if size < tail_size:
        return None
    handle.seek(size - tail_size)
    tail = handle.read(tail_size)
    comment = tail[_END_SIZE:]
    if (
        tail[:4] != _ZIP_END
        or tail[_END_SIZE - 2 : _END_SIZE] != struct.pack("<H", _SEAL_SIZE)
        or not comment.startswith(_SEAL_PREFIX)
    ):
        return None
    return comment[len(_SEAL_PREFIX) :].decode("ascii", "replace"), size - _SEAL_SIZE - 2


def _sha256(handle: BinaryIO, length: int) -> str:
    """SHA-256 of the first ``length`` bytes of ``handle`` and two zero bytes."""
    digest = hashlib.sha256()
    handle.seek(0)
    remaining = length
    while remaining > 0:
        chunk = handle.read(min(remaining, _CHUNK))
        if not chunk:
            break
        digest.update(chunk)
        remaining -= len(chunk)
    digest.update(b"\0\0")
    return digest.hexdigest()


def _check_bytes(handle: BinaryIO, corrupt: Callable[[str], LibraryFileError]) -> bool:
    """Raise ``corrupt(reason)`` (which names the file and what it should be) unless
    ``handle`` is a sealed file matching its seal, an unsealed zip archive whose records
    match their CRC-32 (for both: return ``True``, the bytes are whole), or not a zip
    archive at all (torch's legacy format, or a foreign file: return ``False``, torch
    decides)."""
    size = handle.seek(0, os.SEEK_END)
    if size == 0:
        raise corrupt("the file is empty (0 bytes): truncated or not a torch file")
    sealed = _sealed_digest(handle, size)
    if sealed is not None:
        expected, length = sealed
        found = _sha256(handle, length)
        if found != expected:
            raise corrupt(
                "the file is corrupt: its bytes do not match the checksum written with it "
                f"(sha256 expected {expected[:16]}..., found {found[:16]}...); it was "
                "damaged after it was written (disk, copy, transfer): restore or regenerate it"
            )
        return True
    handle.seek(0)
    if handle.read(4) != _ZIP_START:
        return False
    handle.seek(0)
    try:
        with zipfile.ZipFile(handle) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, struct.error, OSError) as exc:
        raise corrupt(
            f"truncated or not a torch file ({size} bytes, and no complete zip archive: "
            f"{type(exc).__name__}: {exc})"
        ) from exc
    if damaged is not None:
        raise corrupt(
            f"the file is corrupt: its record {damaged!r} does not match its CRC-32; it was "
            "damaged after it was written (disk, copy, transfer): restore or regenerate it"
        )
    return True


def first_non_finite(payload: Any, where: str = "") -> tuple[str, torch.Tensor] | None:
    """The first floating (or complex) tensor in ``payload`` holding NaN or an infinity,
    with where it is (``"['model']['conv.weight']"``), or ``None``.

    ``payload`` is a loaded file: tensors in dicts, lists and tuples; plain Python numbers
    (``best_val_loss = inf``) are not weights and are not checked.
    """
    if isinstance(payload, torch.Tensor):
        checked = payload.layout == torch.strided and (
            payload.is_floating_point() or payload.is_complex()
        )
        # a finite sum proves every value finite (NaN and infinities propagate) and is ~20x
        # faster than isfinite's mask; a sum that overflowed is told apart by the mask
        if (
            checked
            and not bool(torch.isfinite(payload.sum()))
            and not bool(torch.isfinite(payload).all())
        ):
            return where, payload
        return None
    if isinstance(payload, Mapping):
        items: Iterable[tuple[Any, Any]] = payload.items()
    elif isinstance(payload, (list, tuple)):
        items = enumerate(payload)
    else:
        return None
    for key, value in items:
        found = first_non_finite(value, f"{where}[{key!r}]")
        if found is not None:
            return found
    return None


def load_torch_file(
    path: PathLike,
    *,
    what: str = "torch file",
    error: type[LibraryFileError] = LibraryFileError,
    hint: str = "",
    check_finite: bool = True,
) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, after checking the file's bytes,
    with errors that name the file.

    The file is opened once: its checksum (or its zip records' CRC-32s, for a file
    without one; see the module) is checked and the very same bytes are loaded, even if
    another process replaces the file meanwhile.

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
    check_finite
        Refuse a file whose floating tensors hold NaN or infinite values (weights of a
        diverged run, or bytes changed under a valid checksum); pass ``False`` only for
        foreign files whose buffers may legitimately be infinite.

    Raises
    ------
    FileNotFoundError, IsADirectoryError, PermissionError
        As ``open`` raises them (they already name the path).
    CorruptFileError
        (combined with ``error``, see :func:`corrupt_error_class`) The file is empty,
        truncated, or its bytes do not match their checksum; the message names the file.
    LibraryFileError
        (``error``) The file holds a pickled object that is not tensors and plain
        containers, is not a torch file, or (``check_finite``) holds a non-finite tensor:
        the message names the file and the tensor's place in it.
    """
    advice = f" ({hint})" if hint else ""

    def fail(reason: str, kind: type[LibraryFileError] = error) -> LibraryFileError:
        return kind(f"{path}: cannot read the {what}{advice}: {reason}")

    def corrupt(reason: str) -> LibraryFileError:
        return fail(reason, corrupt_error_class(error))

    with open(path, "rb") as handle:
        whole = _check_bytes(handle, corrupt)
        handle.seek(0)
        try:
            payload = torch.load(handle, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds for a foreign or damaged file
            reason = (str(exc).strip().splitlines() or [""])[0][:200]
            # whole bytes that torch refuses hold something else than tensors and plain
            # containers (a pickled module...); other bytes are no torch file, or a cut one
            kind = (
                "a torch file torch.load(weights_only=True) refuses"
                if whole
                else "truncated or not a torch file"
            )
            raise fail(f"{kind}: {type(exc).__name__}: {reason}") from exc
    if check_finite:
        found = first_non_finite(payload)
        if found is not None:
            where, tensor = found
            n_nan = int(torch.isnan(tensor).sum())
            n_inf = int(torch.isinf(tensor).sum())
            raise error(
                f"{path}: the {what} holds non-finite values: {where or 'the tensor'} has "
                f"{n_nan} NaN and {n_inf} infinite of {tensor.numel()} values (weights of a "
                "diverged run, or a damaged file): it cannot be used"
            )
    return payload


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
        """Read ``path`` with :func:`load_torch_file` (its checksum and its tensors'
        finiteness checked) and :meth:`check` it."""
        return self.check(load_torch_file(path, what=f"{self.what} file", error=self.error), path)

    def save(self, entries: Mapping[str, Any], path: PathLike) -> Path:
        """Write :meth:`header` and ``entries`` to ``path`` atomically, sealed with their
        checksum (:func:`save_torch_file`)."""
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

"""File name patterns: which files of a folder are a data set's images, labels, inputs.

:func:`unet3d.cases.cases_from_patterns` and :func:`unet3d.cases.load_images` (and so
``unet3d train --image-pattern / --label-pattern`` and ``unet3d predict --pattern /
--exclude``) search folders with these patterns.

A pattern is a path relative to the folder, with ``/`` between folder names, in glob
syntax: ``*`` is any run of characters within one name, ``?`` one character, ``[ab]`` /
``[!ab]`` one character of (not of) a set, and a ``**`` name any number of folders (none
included).  ``{id}`` is the case id: any non-empty run of characters within one name, as
long as it can be (``{id}_*.nii.gz`` gives ``sub-01_ses-1`` for ``sub-01_ses-1_T1w.nii.gz``);
every ``{id}`` of a pattern is the same text (``{id}/{id}_flair.nii.gz``).  Hidden files and
folders (names starting with ``.``, such as macOS's ``._x.nii.gz``) are never matched, and
symbolic links to folders are followed, except into a folder they lie in.

>>> compile_pattern("{id}/{id}_flair.nii.gz").fullmatch("p01/p01_flair.nii.gz")["id"]
'p01'
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ID", "check_pattern", "compile_pattern", "pattern_depth", "walk_files"]

#: The placeholder of the case id in a pattern.
ID = "{id}"


def check_pattern(pattern: str, name: str = "pattern", *, needs_id: bool = True) -> None:
    """Check that ``pattern`` is a pattern of files under a folder (module docstring).

    Parameters
    ----------
    pattern
        E.g. ``"{id}_t1.nii.gz"``, ``"images/{id}.nii.gz"``, ``"*/{id}_flair.nii.gz"``.
    name
        How the message names the pattern: the argument (``image_pattern``) or the
        command-line flag (``--image-pattern``).
    needs_id
        Whether ``pattern`` must say where the case id is (``{id}``).

    Raises
    ------
    ValueError
        Empty, absolute, with an empty, ``.`` or ``..`` folder name, with a ``{`` or ``}``
        that is not part of ``{id}``, a malformed set (``[z-a]``), or without ``{id}``
        when ``needs_id``.
    """
    where = f"{name} {pattern!r}"
    if not pattern:
        raise ValueError(f"{name} is empty: give a file pattern such as '{ID}.nii.gz'")
    if pattern.startswith("/"):
        raise ValueError(f"{where} is absolute: give it relative to the folder")
    if any(part in ("", ".", "..") for part in pattern.split("/")):
        raise ValueError(f"{where} has an empty, '.' or '..' folder name")
    if "{" in pattern.replace(ID, "") or "}" in pattern.replace(ID, ""):
        raise ValueError(f"{where}: braces are only allowed as {ID}, the case id")
    try:
        regex = compile_pattern(pattern)
    except re.error as error:  # e.g. a set's range backwards, "[z-a]"
        raise ValueError(f"{where} is not a valid pattern ({error})") from None
    # an {id} inside a [set] is a set's characters, not the id: ask the translation
    if needs_id and "id" not in regex.groupindex:
        raise ValueError(
            f"{where} has no {ID}: put {ID} where the case id is, e.g. '{ID}_t1.nii.gz' "
            f"or '{ID}/{ID}_flair.nii.gz'"
        )


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The regular expression of a pattern (checked by :func:`check_pattern`), to match
    whole relative paths (``/``-separated) with ``fullmatch``; its ``{id}`` is the group
    ``id``."""
    out: list[str] = []
    seen_id = False
    parts = pattern.split("/")
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        if part == "**":
            # any number of folders; a final ** is any file at any depth
            out.append(r"(?:[^/]+/)*[^/]+" if last else r"(?:[^/]+/)*")
            continue
        i = 0
        while i < len(part):
            if part.startswith(ID, i):
                out.append("(?P=id)" if seen_id else "(?P<id>[^/]+)")
                seen_id, i = True, i + len(ID)
                continue
            char = part[i]
            i += 1
            if char == "*":
                out.append("[^/]*")
            elif char == "?":
                out.append("[^/]")
            elif char == "[":
                # a set as in fnmatch: "[!...]" negates, a "]" right after "[" or "[!" is
                # a member; an unclosed "[" is a literal
                j = i + (i < len(part) and part[i] == "!")
                j += j < len(part) and part[j] == "]"
                close = part.find("]", j)
                if close < 0:
                    out.append(re.escape(char))
                    continue
                members = part[i:close].replace("\\", "\\\\")
                if members.startswith("!"):
                    members = "^" + members[1:]
                elif members.startswith("^"):
                    members = "\\" + members
                out.append(f"(?!/)[{members}]")
                i = close + 1
            else:
                out.append(re.escape(char))
        if not last:
            out.append("/")
    return re.compile("".join(out))


def pattern_depth(pattern: str | None) -> int | None:
    """How many folders deep the files of ``pattern`` lie (``None``: any depth, or no
    pattern); :func:`walk_files` then need not look deeper."""
    if pattern is None or "**" in pattern.split("/"):
        return None
    return pattern.count("/")


def walk_files(root: Path, max_depth: int | None) -> Iterator[str]:
    """The ``/``-separated paths, relative to ``root``, of its files at most ``max_depth``
    folders deep (``None``: any depth), hidden ones left out; each folder's files in name
    order, before its subfolders'."""
    # followlinks: data sets are often assembled from links to folders.  A link to a
    # folder it lies in would loop: a folder already on the path from root is not entered.
    above: dict[str, frozenset[tuple[int, int]]] = {}
    for folder, subfolders, names in os.walk(root, followlinks=True):
        info = os.stat(folder)
        path = above.get(os.path.dirname(folder), frozenset())
        if (info.st_dev, info.st_ino) in path:
            subfolders[:] = []
            continue
        above[folder] = path | {(info.st_dev, info.st_ino)}
        rel = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        if max_depth is not None and prefix.count("/") >= max_depth:
            subfolders[:] = []  # the pattern's files lie no deeper
        else:
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and os.path.isfile(os.path.join(folder, name)):
                yield prefix + name

"""Shared result writing for the benchmark scripts.

Every benchmark calls :func:`write_results` once, which leaves two files in the results
directory:

* ``<name>.json``: the configuration, the environment the numbers were measured in and one
  record per measured row, for machines (plots, regression checks);
* ``<name>.md``: the Markdown table and the exact command that produced it, for people.

Both files are replaced atomically, so an interrupted run never leaves a half-written
result next to a complete one from an earlier run.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import dwp
from dwp.io import clean_stale_temporaries, write_json, write_text

__all__ = ["DEFAULT_OUT_DIR", "environment", "markdown_table", "write_results"]

DEFAULT_OUT_DIR = Path("benchmarks/results")


#: The source tree whose commit a result records: the one these benchmarks run from.
SOURCE_DIR = Path(__file__).resolve().parent


def _git(source: Path, *args: str) -> str | None:
    """The output of ``git -C source args``, or ``None`` when it fails (no repository, no
    ``git``, a timeout)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(source), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


def _git_commit(source: Path = SOURCE_DIR) -> str | None:
    """The commit checked out in ``source``'s repository, or ``None`` outside a repository
    or without ``git``.

    Asked of the benchmarks' own folder, not of the current one: a benchmark started from
    another folder (a scratch directory, another clone) records the code that ran.  A
    benchmark must still write its results from an exported tarball, an installed copy or
    a repository without commits, so every failure is tolerated.
    """
    out = _git(source, "rev-parse", "HEAD")
    return None if out is None else (out.strip() or None)


#: Tracked files that are no code: results (a benchmark writes its figure before its
#: report) and Markdown documents; changed, they leave the numbers' code as committed.
NOT_CODE = (":(top,exclude)benchmarks/results", ":(top,exclude)*.md")


def _git_dirty(source: Path = SOURCE_DIR) -> bool | None:
    """Whether tracked code files of ``source``'s repository differ from its commit (the
    numbers then come from code no commit holds; :data:`NOT_CODE` aside), or ``None``
    where :func:`_git_commit` is."""
    out = _git(source, "status", "--porcelain", "--untracked-files=no", "--", ":/", *NOT_CODE)
    return None if out is None else bool(out.strip())


def environment() -> dict[str, Any]:
    """Describe the software and machine the numbers are measured on.

    Returns
    -------
    dict
        ``dwp`` (the installed package's version), ``torch``, ``python``, ``platform``,
        ``machine``, ``cpu_count``, ``num_threads`` (torch's intra-op threads at the time
        of the call), ``git_commit`` (of the benchmarks' source tree; ``None`` when
        unavailable) and ``git_dirty`` (tracked files changed since that commit).
    """
    return {
        "dwp": dwp.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "num_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
    }


def _cell(value: Any) -> str:
    # A literal "|" would split the cell; newlines would end the row.
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Render a GitHub-flavoured Markdown table.

    Parameters
    ----------
    headers
        Column titles.
    rows
        One sequence of cells per row, each as long as ``headers``; cells are formatted
        with ``str`` (format numbers before passing them in).

    Returns
    -------
    str
        The table, without a trailing newline.

    Raises
    ------
    ValueError
        If a row has a different number of cells than there are headers.
    """
    lines = [
        "| " + " | ".join(_cell(h) for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"row {i} has {len(row)} cells, expected {len(headers)}")
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines)


def _default_command() -> str:
    return shlex.join([Path(sys.executable).name, *sys.argv])


def write_results(
    name: str,
    config: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    table_md: str,
    out_dir: Path | str = DEFAULT_OUT_DIR,
    *,
    command: str | None = None,
) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` to ``out_dir``, each atomically.

    Parameters
    ----------
    name
        Base name of the result files (e.g. ``"speed"`` or ``"speed_quick"``).
    config
        The benchmark's settings (JSON-serialisable).
    rows
        One JSON-serialisable record per measured row.
    table_md
        The human-readable Markdown table of the results.
    out_dir
        Directory for the files; created if missing.
    command
        The command line that reproduces the run.  Default: this process's ``sys.argv``;
        pass it explicitly when the benchmark is called as a function (from a test or a
        console script), where ``sys.argv`` belongs to someone else.

    Returns
    -------
    tuple of Path
        The JSON and the Markdown file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out_dir)
    command = _default_command() if command is None else command
    env = environment()

    payload = {
        "name": name,
        "command": command,
        "config": dict(config),
        "environment": env,
        "rows": [dict(row) for row in rows],
    }
    json_path = out_dir / f"{name}.json"
    write_json(json_path, payload, indent=2)

    commit = (env["git_commit"] or "unknown") + (
        " with uncommitted changes" if env.get("git_dirty") else ""
    )
    markdown = (
        f"# {name}\n\n"
        f"{table_md.rstrip()}\n\n"
        f"Produced by:\n\n```\n{command}\n```\n\n"
        f"dwp {env['dwp']}, torch {env['torch']}, Python {env['python']}, {env['platform']}, "
        f"{env['num_threads']} threads, commit {commit}.\n"
    )
    md_path = out_dir / f"{name}.md"
    write_text(md_path, markdown)
    return json_path, md_path

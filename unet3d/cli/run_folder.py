"""``unet3d train``'s checks of its ``--out`` folder: a new run, or the same run resumed.

A new run must not start among another run's files (an old ``best.pt`` would pass for its
own, :mod:`unet3d.run_files`), and a ``--resume`` must continue the run in the folder: the
same settings (``last.pt``'s config) and the same data (``config.json``'s fingerprint,
:mod:`unet3d.fingerprint`).  Each refusal is one line naming what differs, before anything
is written.  The heavy modules are imported when a check runs, as in the rest of the CLI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["RESUME_FREE", "check_new_run", "check_resume", "data_source"]

#: TrainConfig entries that may differ between a run and its ``--resume``.
RESUME_FREE = ("out_dir", "progress", "num_workers")


def data_source(args: argparse.Namespace) -> dict[str, Any]:
    """The options that chose the cases, for the data fingerprint (paths resolved: a
    resume started from another working folder names the same files)."""

    def resolved(path: Path | None) -> str | None:
        return None if path is None else str(path.resolve())

    return {
        "--data": resolved(args.data),
        # absent from runs of earlier releases, which data_changes reads as None: the same
        "--image-pattern": args.image_pattern,
        "--label-pattern": args.label_pattern,
        "--csv": resolved(args.csv),
        "--split": args.split,
        "--val-data": resolved(args.val_data),
        "--val-csv": resolved(args.val_csv),
        "--val-split": args.val_split,
        "--val-fraction": args.val_fraction,
    }


def check_new_run(out_dir: Path, *, overwrite: bool) -> None:
    """A new run (no ``--resume``) starts in a folder without another run's files, or
    replaces them (``--overwrite``) before it writes anything.

    Raises
    ------
    unet3d.run_files.RunFolderError
        ``out_dir`` holds a run (``config.json`` included) and not ``overwrite``.
    """
    from ..run_files import clear_run_files, previous_run_error, previous_run_files

    if overwrite:
        clear_run_files(out_dir, extra=("config.json",))  # last.pt first, config.json last
        return
    previous = previous_run_files(out_dir, extra=("config.json",))
    if previous:
        advice = "continue it with --resume, replace it with --overwrite, or use another --out"
        raise previous_run_error(out_dir, previous, advice)


def check_resume(out_dir: Path, config: dict[str, Any], data: dict[str, Any]) -> None:
    """A ``--resume`` must continue the same run: compare ``config`` with ``last.pt``'s
    and ``data`` with the fingerprint in ``config.json`` (a run without one resumes, with a
    warning on stderr).  Without ``last.pt`` the run starts afresh, unless the folder holds
    a run's other files (a ``best.pt`` must not be lost to a ``--resume``).

    Raises
    ------
    ValueError
        Other settings or data (naming each difference), or files of a run that cannot
        be continued (:class:`unet3d.run_files.RunFolderError`).
    """
    from ..checkpoint import read_run_description
    from ..config import TrainConfig
    from ..fingerprint import data_changes, stored_fingerprint
    from ..run_files import previous_run_error, previous_run_files

    last = out_dir / "last.pt"
    if not last.is_file():
        leftovers = previous_run_files(out_dir)  # config.json alone: cut before epoch 0 ended
        if leftovers:  # e.g. a best.pt whose last.pt was removed: not to be lost silently
            advice = "it has no last.pt to continue: replace it with --overwrite"
            raise previous_run_error(out_dir, leftovers, advice)
        return  # nothing to resume: a fresh run
    stored = read_run_description(last).config
    # a setting added since the run started is missing from its config: it had the default
    defaults = TrainConfig().as_dict()
    stored = {**{k: v for k, v in defaults.items() if k not in stored}, **stored}
    changed = [
        f"{k}: {stored.get(k)!r} -> {config.get(k)!r}"
        for k in sorted(config.keys() | stored.keys())
        if k not in RESUME_FREE and config.get(k) != stored.get(k)
    ]
    record = out_dir / "config.json"
    stored_data = stored_fingerprint(record)
    if stored_data is None:  # a run from before fingerprints: it still resumes
        print(
            f"warning: {record}: no data fingerprint (a run from an earlier release); "
            "the data are not checked against the run's",
            file=sys.stderr,
        )
    else:
        changed += data_changes(stored_data, data)
    if changed:
        raise ValueError(
            f"{last}: --resume with other settings or data than the run it continues "
            f"({'; '.join(changed)}); use a new --out folder instead"
        )

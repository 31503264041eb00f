"""The results of a run: the record of its settings, merging with the sections of an
earlier results file that this run did not measure, and the Markdown report.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..report import environment
from .fit import render_fit
from .kl import render_kl
from .layers import render_layers
from .machine import busy_note
from .precision import render_precision
from .settings import SECTIONS
from .unet3d import render_unet3d

__all__ = ["RENDERERS", "TITLES", "markdown", "merge_previous", "run_record"]

#: Tables of a section from its rows (to rebuild the Markdown of merged results).
RENDERERS: dict[str, Callable[[Sequence[dict[str, Any]]], str]] = {
    "layers": render_layers,
    "kl": render_kl,
    "fit": render_fit,
    "unet3d": render_unet3d,
    "precision": render_precision,
}
TITLES = {
    "layers": "layers: training step, Bayesian 3x3x3 convs vs deterministic UNet3D",
    "kl": "kl: deep weight prior bound (forward + backward) vs deterministic training step",
    "fit": "fit: dwp.fit_kernel_vae wall time",
    "unet3d": "unet3d: training step per strategy vs random_init; sliding-window inference",
    "precision": "precision: float32 vs mixed-precision training steps on --device; KL share",
}
#: The settings of a run that :func:`run_record` records besides the command and commit.
_RUN_SETTINGS = ("seed", "size", "batch", "steps", "threads", "allocator")


def run_record(args: argparse.Namespace, command: str, allocator: str) -> dict[str, Any]:
    """The settings of this run, kept per section when results are merged.

    Returns
    -------
    dict
        ``command``, ``git_commit``, ``git_dirty`` (tracked files changed since that
        commit), ``seed``, ``size``, ``batch``, ``steps``, ``threads`` and ``allocator``.
    """
    env = environment()
    return {
        "command": command,
        "git_commit": env["git_commit"],
        "git_dirty": env["git_dirty"],
        "seed": args.seed,
        "size": args.size,
        "batch": args.batch,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "allocator": allocator,
    }


def merge_previous(
    path: Path, sections: Sequence[str], rows: list[dict[str, Any]], config: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Add the sections of an earlier results file that this run did not measure.

    Running one section (``--sections unet3d``) then updates its rows, config and tables in
    ``speed.json`` / ``speed.md`` and keeps the others' as they were measured, each with
    the command and commit that produced it (``config["section_runs"]``).

    Returns
    -------
    rows, config
        Merged, sections in :data:`SECTIONS` order; unchanged when there is nothing to keep.
    """
    try:
        previous = json.loads(path.read_text())
        old_config, old_rows = previous["config"], previous["rows"]
        old_sections = list(old_config["sections"])
    except (OSError, ValueError, KeyError, TypeError):
        return rows, config  # no (readable) earlier results: nothing to keep
    if bool(old_config.get("quick")) != bool(config["quick"]):
        return rows, config
    kept = [s for s in old_sections if s in SECTIONS and s not in sections]
    if not kept:
        return rows, config
    old_runs = old_config.get("section_runs") or {}
    merged = dict(config)
    order = [s for s in SECTIONS if s in kept or s in sections]
    merged["sections"] = order
    for key in ("section_wall_s", "other_processes_cores", "section_runs"):
        both = {**(old_config.get(key) or {}), **config[key]}
        merged[key] = {s: both[s] for s in order if s in both}
    for section in kept:
        merged[section] = old_config.get(section)
        if section not in old_runs:  # a file written before section_runs existed
            merged["section_runs"][section] = {
                "command": previous.get("command"),
                "git_commit": (previous.get("environment") or {}).get("git_commit"),
                **{k: old_config.get(k) for k in _RUN_SETTINGS},
            }
    by_section = {s: [r for r in old_rows if r.get("section") == s] for s in kept}
    by_section.update({s: [r for r in rows if r["section"] == s] for s in sections})
    return [r for s in order for r in by_section[s]], merged


def markdown(rows: Sequence[dict[str, Any]], config: dict[str, Any]) -> tuple[str, str]:
    """The Markdown body (notes, one table per section, footer) and the command(s).

    Returns
    -------
    body, command
        The body; the command that produced the results, or one line per run that
        contributed sections (each followed by ``# <its sections>``) for merged results.
    """
    sections = config["sections"]
    runs = config["section_runs"]
    walls, loads = config["section_wall_s"], config["other_processes_cores"]
    notes = []
    if config["quick"]:
        notes.append("**QUICK smoke run: too small and too short to compare with the targets.**")
    notes += busy_note({s: loads.get(s) for s in sections})
    tables = [
        f"## {TITLES[s]}\n\n{RENDERERS[s]([r for r in rows if r['section'] == s])}"
        for s in sections
    ]
    # one footer line and one command per run that contributed sections
    commands: dict[str, list[str]] = {}
    for s in sections:
        commands.setdefault(runs[s]["command"], []).append(s)
    footers = []
    for members in commands.values():
        run = runs[members[0]]
        wall = ", ".join(f"{s} {walls[s]:.0f} s" for s in members if walls.get(s) is not None)
        load = ", ".join(
            f"{s} {'n/a' if loads.get(s) is None else f'{loads[s]:.2f}'}" for s in members
        )
        footers.append(
            f"{', '.join(members)}: allocator {run['allocator']}; {wall}; {run['threads']} "
            f"threads, seed {run['seed']}, commit {run['git_commit'] or 'unknown'}"
            f"{' with uncommitted changes' if run.get('git_dirty') else ''}. Cores kept "
            f"busy by other processes, on average: {load}."
        )
    if len(commands) > 1:
        command = "\n".join(f"{c}  # {', '.join(m)}" for c, m in commands.items())
    else:
        command = next(iter(commands))
    return "\n\n".join([*notes, *tables, *footers]), command

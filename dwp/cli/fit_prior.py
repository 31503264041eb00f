"""``dwp fit-prior``: source networks in, a prior file, its fit report and a figure out.

What the Python API does in several calls (README, "The deep weight prior in five steps"),
in one command::

    bank = dwp.collect_kernels(SOURCES, group_by=..., include=..., kernel_shape=...,
                               min_norm=...)                   # or dwp.KernelBank.load(BANK)
    prior = dwp.DeepWeightPrior.fit(bank, seed=..., epochs=...)  # or another kind
    prior.save(OUT)

with the same validation and errors (the library raises them; :mod:`dwp.cli` prints them
as one ``error:`` line) and the same result: an option left out is an argument left out,
so the library's default applies.  Each kind takes only its own options; one that does
not apply to ``--kind`` is a usage error rather than silently ignored.

Nothing is written until everything has been computed; then the outputs are written one by
one, each atomically, the prior file last, and a failure while writing removes those this
run wrote.  Existing outputs are refused unless ``--overwrite``, before any work starts.
"""

from __future__ import annotations

import argparse
import fnmatch
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._version import __version__
from ..extras import is_installed
from ..io import atomic_write, write_json, write_text
from ..kernel_bank import KernelBank
from ..kernels import collect_kernels
from ..plot import plot_prior_samples
from .fit_prior_options import add_parser as _add_parser
from .fit_prior_options import check, library_options
from .kinds import KINDS, Fit, Kind, fit_kernel_prior, fit_swag, make_plain
from .report import bank_summary, held_out_figure, plain, render_markdown

__all__ = ["add_parser", "run"]


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``fit-prior`` to the ``dwp`` subcommands (:mod:`dwp.cli.fit_prior_options`);
    returns its parser."""
    return _add_parser(commands, run)


# -- outputs ------------------------------------------------------------------------------
def _beside(out: Path, suffix: str) -> Path:
    """``prior.pt`` -> ``prior<suffix>`` in the same folder."""
    return out.with_name(out.stem + suffix) if out.suffix else out.with_name(out.name + suffix)


def _has_matplotlib() -> bool:
    """Whether the figures can be drawn (matplotlib is optional: ``dwp[plot]``); asked before
    any work, so a missing matplotlib is a note, not a failure after the fit."""
    return is_installed("matplotlib")


def _plan_outputs(args: argparse.Namespace, kind: Kind, notes: list[str]) -> dict[str, Path]:
    """Name -> path of every file this run will write; checks, before any work, that they
    are distinct, that their folders exist and that none exists unless ``--overwrite``."""
    report = args.report or _beside(args.out, ".report.json")
    outputs = {"prior": args.out, "report": report, "markdown": report.with_suffix(".md")}
    if args.bank_out is not None:
        outputs["bank"] = args.bank_out
    scored = kind.source == "kernels" and (args.test_fraction is None or args.test_fraction > 0)
    scored = scored or (kind.name == "swag" and bool(args.held_out))
    figures = {}
    if scored:
        figures["figure"] = args.figure or _beside(args.out, ".report.png")
    if args.samples_figure is not None:
        figures["samples_figure"] = args.samples_figure
    if figures and not _has_matplotlib():
        notes.append("no figure: matplotlib is not installed (pip install 'dwp[plot]')")
    else:
        outputs.update(figures)
    seen: dict[Path, str] = {}
    for name, path in outputs.items():
        key = path.resolve()
        if key in seen:
            raise ValueError(f"{path}: both the {seen[key]} and the {name} output; give two paths")
        seen[key] = name
        if not path.parent.is_dir():
            raise FileNotFoundError(2, "output folder does not exist", str(path.parent))
        if path.is_dir():
            raise IsADirectoryError(21, "is a folder, not an output file", str(path))
        if path.exists() and not args.overwrite:
            raise FileExistsError(17, "exists; pass --overwrite to replace it", str(path))
    return outputs


def _write_all(writes: list[tuple[Path, Callable[[Path], Any]]]) -> None:
    """Call each writer in order (each writes its file atomically); if one fails, remove the
    files written before it, so a failed run leaves no mix of new and missing outputs."""
    done: list[Path] = []
    try:
        for path, write in writes:
            write(path)
            done.append(path)
    except BaseException:  # Ctrl-C too
        for path in done:
            path.unlink(missing_ok=True)
        raise


def _write_bytes(data: bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with atomic_write(path) as handle:
            handle.write(data)

    return write


# -- the command --------------------------------------------------------------------------
class _GroupRules:
    """``group_by`` of :func:`dwp.collect_kernels` from ``--group PATTERN=GROUP`` rules:
    the first matching pattern's group; a layer that none matches is an error."""

    def __init__(self, rules: list[tuple[str, str]]) -> None:
        self.rules, self.used = rules, set()

    def __call__(self, layer: str) -> str:
        for pattern, group in self.rules:
            if fnmatch.fnmatchcase(layer, pattern):
                self.used.add(pattern)
                return group
        patterns = [pattern for pattern, _ in self.rules]
        raise ValueError(
            f"layer {layer!r} matches no --group pattern {patterns}; add one (e.g. "
            f"--group '*=other') or leave the layer out with --include"
        )

    def __repr__(self) -> str:  # the bank's metadata names the grouping by it
        return "--group " + " ".join(f"{p}={g}" for p, g in self.rules)


def _say(message: str) -> None:
    print(f"dwp fit-prior: {message}", file=sys.stderr, flush=True)


def _read_bank(args: argparse.Namespace) -> KernelBank:
    """The kernel bank: ``--bank`` (pruned by ``--min-norm``) or collected from SOURCE."""
    if args.bank is not None:
        bank = KernelBank.load(args.bank)
        return bank if args.min_norm is None else bank.prune(args.min_norm)
    rules = _GroupRules(args.group) if args.group else None
    options = {
        "group_by": rules or args.group_by, "include": args.include,
        "kernel_shape": args.kernel_shape, "min_norm": args.min_norm,
    }  # fmt: skip
    _say(f"reading {len(args.sources)} source(s)")
    bank = collect_kernels(
        args.sources, **{k: v for k, v in options.items() if v is not None}
    )  # fmt: skip
    if rules is not None:
        unused = [p for p, _ in rules.rules if p not in rules.used]
        if unused:
            raise ValueError(
                f"--group patterns {unused} match no chosen layer; layers: {bank.layer_names}"
            )
    return bank


def run(args: argparse.Namespace) -> int:
    """Run ``dwp fit-prior`` (after argparse); returns the exit status, 0.

    Errors are raised (:mod:`dwp.cli` prints them); usage errors exit through argparse.
    """
    started = time.perf_counter()
    kind = KINDS[args.kind]
    check(args, kind)
    notes: list[str] = []
    outputs = _plan_outputs(args, kind, notes)
    options = library_options(args, kind)

    bank = None
    if kind.source == "kernels":
        bank = _read_bank(args)
        _say(f"kernel bank: {bank!r}")
        _say(f"fitting a {kind.cls.__name__} on {len(bank.group_names)} group(s)")
        fit: Fit = fit_kernel_prior(kind, bank, options, progress=not args.no_progress)
    elif kind.source == "moments":
        fit = fit_swag(args.moments, args.held_out or [], options)
    else:
        fit = make_plain(kind, options)

    figure_png = None
    if "figure" in outputs:
        if fit.scores is None:  # e.g. every group too small for a test kernel: nothing to draw
            notes.append("no figure: there are no held-out scores to draw")
            del outputs["figure"]
        else:
            figure_png = held_out_figure(fit.scores)

    report: dict[str, Any] = {
        "command": shlex.join(["dwp", *args.argv]),
        "dwp_version": __version__,
        "kind": kind.name,
        "inputs": {
            "sources": [str(s) for s in args.sources],
            "bank": None if args.bank is None else str(args.bank),
            "moments": None if args.moments is None else str(args.moments),
            "held_out": [str(p) for p in args.held_out or []],
        },
        "options": plain(options),
        "outputs": {name: str(path) for name, path in outputs.items()},
        "bank": None if bank is None else bank_summary(bank),
        "prior": plain(fit.prior.describe()),
        "held_out": plain(fit.scores),
        "scored": fit.scored or None,
        "split": fit.split,
        "notes": notes,
        "seconds": time.perf_counter() - started,
    }
    markdown = render_markdown(report, kind, fit, bank)

    writes: list[tuple[Path, Callable[[Path], Any]]] = []
    if "bank" in outputs:
        writes.append((outputs["bank"], bank.save))
    if figure_png is not None:
        writes.append((outputs["figure"], _write_bytes(figure_png)))
    if "samples_figure" in outputs:
        seed = fit.prior.metadata.get("seed", 0)
        writes.append(
            (outputs["samples_figure"], lambda p: plot_prior_samples(bank, fit.prior, p, seed=seed))
        )
    writes.append((outputs["report"], lambda p: write_json(p, report)))
    writes.append((outputs["markdown"], lambda p: write_text(p, markdown)))
    writes.append((outputs["prior"], fit.prior.save))  # last: a prior file means a full run
    _write_all(writes)

    print(markdown, end="")
    _say("wrote " + ", ".join(str(path) for path, _ in writes))
    return 0

"""The ``dwp`` command line: ``dwp fit-prior`` (also ``python -m dwp fit-prior``).

``fit-prior``
    Source checkpoints or state dicts (or a saved kernel bank, or a SWAG moments file) in;
    a prior file of any kind :func:`dwp.priors.load_prior` reads, its fit report (JSON and
    a Markdown table) and a figure out (:mod:`dwp.cli.fit_prior`).

Errors in the input (a missing or damaged file, no layer matching, a kernel shape the
sources lack: every :class:`dwp.LibraryFileError`, other ``ValueError`` and ``OSError``)
and numerical failures (``FloatingPointError``) are printed as one ``error: <message>``
line with exit status 2, the status argparse gives bad command-line arguments; nothing is
written then.  Ctrl-C exits with status 130, also without writing anything.

Examples
--------
::

    dwp fit-prior run1/best.pt run2/best.pt --kind dwp --epochs 100 --out prior.pt
    dwp fit-prior --bank bank.pt --kind kernel-gaussian --out gaussian.pt
    dwp fit-prior --moments run1/swag.pt --kind swag --scale 1000 --out swag.pt
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..argparse_types import error_line
from ..extras import add_version_argument
from . import fit_prior

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "build_parser", "main"]

#: Exit status of an input error (the same as argparse's for bad arguments).
EXIT_ERROR = 2
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The ``dwp`` argument parser (subcommand ``fit-prior``)."""
    parser = argparse.ArgumentParser(
        prog="dwp", description="Bayesian deep learning with learned weight priors."
    )
    add_version_argument(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fit_prior.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dwp``; returns the exit status.

    Parameters
    ----------
    argv
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        0 on success, :data:`EXIT_ERROR` (2) for bad input and numerical failures
        (``error: ...`` on stderr), :data:`EXIT_INTERRUPTED` (130) after Ctrl-C.  Bad
        arguments raise ``SystemExit(2)`` from argparse, as usual.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.handler(args)
    except (ValueError, OSError, FloatingPointError) as error:
        # the library's file errors (LibraryFileError is a ValueError) name the file, its
        # selection errors the layer or pattern: the message is the whole story, a
        # traceback would only hide it.
        print(f"error: {error_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED

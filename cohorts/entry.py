"""The ``dwp-cohorts`` console script: a light front for :mod:`cohorts.cli`.

:mod:`cohorts.cli` imports SciPy when imported (its parser lists the cohorts, defined next
to the generator), so this front answers ``--version``, checks that the ``cohorts`` extra
is installed (one ``error: ...`` line and exit status 2 if not, see
:func:`dwp.extras.launch`) and only then runs the command line.  ``python -m cohorts``
runs :mod:`cohorts.cli` without the front.
"""

from __future__ import annotations

from collections.abc import Sequence

from dwp.extras import launch

__all__ = ["EXTRA", "REQUIRES", "TARGET", "main"]

#: The command line this front runs.
TARGET = "cohorts.cli:main"
#: The extra that installs what the cohorts need beyond the core install.
EXTRA = "cohorts"
#: Every import beyond the core install that ``dwp-cohorts`` reaches: the anatomy
#: (nilearn), the deformations and rendering (SciPy) and ``figure`` (matplotlib).
REQUIRES = ("scipy", "nilearn", "matplotlib")


def main(argv: Sequence[str] | None = None) -> int:
    """``dwp-cohorts generate | list | figure``; returns the exit status."""
    return launch(TARGET, prog="dwp-cohorts", requires=REQUIRES, extra=EXTRA, argv=argv)

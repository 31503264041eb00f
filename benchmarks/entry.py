"""The benchmarks' console scripts (``dwp-transfer``, ``dwp-speed``, ``dwp-regression``,
``dwp-variational``): light fronts for the benchmark packages.

A benchmark package imports MONAI, nilearn, SciPy or matplotlib as soon as it is imported,
so a console script pointing at it straight away would end in a traceback on a core
install.  These fronts import nothing heavy: they answer ``--version``, check that the
``bench`` extra is installed (one ``error: ...`` line and exit status 2 if not, see
:func:`dwp.extras.launch`) and only then import the package and run its ``main``.
``python -m benchmarks.<name>`` runs the same ``main`` without the front.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from dwp.extras import launch

__all__ = ["COMMANDS", "EXTRA", "regression", "speed", "transfer", "variational"]

#: The extra that installs what every benchmark needs beyond the core install.
EXTRA = "bench"


class Command(NamedTuple):
    """A console script: the ``main`` it runs and the modules that must be installed."""

    target: str
    requires: tuple[str, ...]


#: console script -> what it runs; ``requires`` lists every import beyond the core install
#: that the benchmark reaches (tests/test_packaging.py checks it against the imports).
COMMANDS: dict[str, Command] = {
    "dwp-transfer": Command(
        "benchmarks.transfer:main", ("monai", "scipy", "nilearn", "matplotlib")
    ),
    "dwp-speed": Command("benchmarks.speed:main", ("monai",)),
    "dwp-regression": Command(
        "benchmarks.regression:main", ("monai", "scipy", "nilearn", "matplotlib")
    ),
    "dwp-variational": Command(
        "benchmarks.variational:main", ("monai", "scipy", "nilearn", "matplotlib")
    ),
}


def _launch(prog: str, argv: Sequence[str] | None) -> int:
    command = COMMANDS[prog]
    return launch(command.target, prog=prog, requires=command.requires, extra=EXTRA, argv=argv)


def transfer(argv: Sequence[str] | None = None) -> int:
    """``dwp-transfer``: the transfer benchmark (:mod:`benchmarks.transfer`)."""
    return _launch("dwp-transfer", argv)


def speed(argv: Sequence[str] | None = None) -> int:
    """``dwp-speed``: the speed suite (:mod:`benchmarks.speed`)."""
    return _launch("dwp-speed", argv)


def regression(argv: Sequence[str] | None = None) -> int:
    """``dwp-regression``: the regression benchmark (:mod:`benchmarks.regression`)."""
    return _launch("dwp-regression", argv)


def variational(argv: Sequence[str] | None = None) -> int:
    """``dwp-variational``: the optimiser-path benchmark (:mod:`benchmarks.variational`)."""
    return _launch("dwp-variational", argv)

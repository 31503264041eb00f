"""Optional dependencies ("extras") and what every command line of the distribution shares.

The core install (``pip install dwp``) brings what :mod:`dwp` itself imports: torch, Pyro,
NumPy and tqdm (plus nibabel for the NIfTI writer).  MONAI, nilearn, SciPy, matplotlib and
the rest come with the extras of ``pyproject.toml`` (``pip install "dwp[unet3d]"``,
``"dwp[cohorts]"``, ...).  Code that needs one says so in one of two ways:

* :func:`require` checks, without importing anything, that modules are installed and
  otherwise raises :class:`MissingExtraError`: a command line calls it before doing any
  work, so that a core install answers with one line naming the extra, not a traceback;
* :func:`from_extra` wraps a module-level import of an optional dependency, so that
  ``import unet3d.losses`` on a core install raises the same error.

:class:`MissingExtraError` is a :class:`ModuleNotFoundError`: code that already catches
``ImportError`` (an optional import with a fallback) keeps working.

For the command lines: :func:`add_version_argument` gives every parser the same
``--version``; :func:`exit_on_missing_extra` turns the error into ``error: <message>`` on
stderr and exit status 2; :func:`launch` is the body of a console script whose real module
imports an extra at import time (it answers ``--version`` and checks the extra before
importing that module).

>>> require("math", extra="plot", needed_by="the figure")  # installed: no error
>>> try:
...     require("no_such_module_xyz", extra="plot", needed_by="the figure")
... except MissingExtraError as error:
...     print(error)
the figure needs no_such_module_xyz, which the core install leaves out: pip install "dwp[plot]"
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import ParamSpec

from ._version import __version__

__all__ = [
    "DISTRIBUTION",
    "EXIT_MISSING_EXTRA",
    "MissingExtraError",
    "add_version_argument",
    "exit_on_missing_extra",
    "from_extra",
    "is_installed",
    "launch",
    "require",
    "version_line",
]

#: The name ``pip`` knows this distribution by (the extras are written ``dwp[extra]``).
DISTRIBUTION = "dwp"
#: Exit status of a command whose extra is missing: argparse's status for a usage error,
#: which it is (the command cannot run as installed).
EXIT_MISSING_EXTRA = 2

#: How the error message spells a module whose usual name differs from its import name.
_DISPLAY_NAMES = {
    "monai": "MONAI",
    "scipy": "SciPy",
    "sklearn": "scikit-learn",
    "tensorboard": "TensorBoard",
}

_P = ParamSpec("_P")


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra that brings it.

    Parameters
    ----------
    module
        The import name that is missing (``"monai"``); also the error's ``name``, as for
        any :class:`ModuleNotFoundError`.
    extra
        The extra of ``pyproject.toml`` that installs it (``"unet3d"``).
    needed_by
        What needs it, as the user knows it: a command (``"unet3d"``) or a module
        (``"unet3d.losses"``).
    """

    def __init__(self, module: str, *, extra: str, needed_by: str) -> None:
        self.extra = extra
        self.needed_by = needed_by
        display = _DISPLAY_NAMES.get(module.partition(".")[0], module)
        super().__init__(
            f"{needed_by} needs {display}, which the core install leaves out: "
            f"{self.install_command}",
            name=module,
        )

    @property
    def install_command(self) -> str:
        """The ``pip`` command that installs the missing extra."""
        return f'pip install "{DISTRIBUTION}[{self.extra}]"'

    def __reduce__(self) -> tuple[object, ...]:
        # keyword-only arguments: the default reduction would call cls(message) and fail
        # when the error crosses a process boundary (a benchmark's worker processes)
        return (
            functools.partial(type(self), extra=self.extra, needed_by=self.needed_by),
            (self.name,),
        )


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it.

    A dotted name imports its parent packages to look inside them: check top-level names
    (``"monai"``, not ``"monai.losses"``) to keep the check cheap.  A name set to ``None``
    in :data:`sys.modules` (how tests block an import) counts as not installed.
    """
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package of a dotted name
        return False
    except ValueError:  # in sys.modules without a __spec__ (e.g. __main__): importable
        return True


def require(*modules: str, extra: str, needed_by: str) -> None:
    """Raise :class:`MissingExtraError` for the first of ``modules`` that is not installed.

    Nothing is imported, so a command can call it before its heavy imports and fail fast.

    Parameters
    ----------
    *modules
        Import names (``"monai"``, ``"scipy"``), checked in order.
    extra
        The extra that installs them.
    needed_by
        What needs them, for the message (a command's name).

    Raises
    ------
    MissingExtraError
        Naming the first missing module, ``needed_by`` and the ``pip`` command.
    """
    for module in modules:
        if not is_installed(module):
            raise MissingExtraError(module, extra=extra, needed_by=needed_by)


@contextmanager
def from_extra(extra: str, *, needed_by: str) -> Iterator[None]:
    """Turn a failed import of an optional dependency into :class:`MissingExtraError`.

    For module-level imports of a dependency that only an extra installs::

        with from_extra("unet3d", needed_by="unet3d.losses"):
            from monai.losses import DiceCELoss

    Only an import of a module that is not installed is translated: a missing submodule of
    an installed package, or any other error, propagates unchanged (it is a bug or a broken
    install, which the extra would not fix).
    """
    try:
        yield
    except MissingExtraError:
        raise
    except ModuleNotFoundError as error:
        missing = (error.name or "").partition(".")[0]
        if not missing or is_installed(missing):
            raise
        raise MissingExtraError(missing, extra=extra, needed_by=needed_by) from error


def version_line(prog: str) -> str:
    """What ``--version`` prints: ``"<prog> (dwp <version>)"``."""
    return f"{prog} ({DISTRIBUTION} {__version__})"


def add_version_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the shared ``--version`` option to ``parser`` (prints :func:`version_line`)."""
    parser.add_argument(
        "--version",
        action="version",
        version=version_line("%(prog)s"),  # argparse fills in the parser's prog
        help="print the version and exit",
    )
    return parser


def _report(error: MissingExtraError) -> int:
    print(f"error: {error}", file=sys.stderr)
    return EXIT_MISSING_EXTRA


def exit_on_missing_extra(main: Callable[_P, int]) -> Callable[_P, int]:
    """Decorate a command's ``main`` so that a missing extra ends it with one line.

    The wrapped function prints ``error: <message>`` on stderr and returns
    :data:`EXIT_MISSING_EXTRA` when :class:`MissingExtraError` escapes ``main`` (from
    :func:`require` or from an import guarded by :func:`from_extra`); its traceback would
    say nothing more than the message.
    """

    @functools.wraps(main)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except MissingExtraError as error:
            return _report(error)

    return wrapper


def launch(
    target: str,
    *,
    prog: str,
    requires: Sequence[str],
    extra: str,
    argv: Sequence[str] | None = None,
) -> int:
    """Run a console script whose module imports optional dependencies when imported.

    A console script imports its module (and that module's packages) before ``main``
    can check anything, so a missing extra would end in a traceback; this light front
    does the checking first, then imports ``target`` and runs it.

    Parameters
    ----------
    target
        ``"package.module:function"``, the real ``main(argv) -> int``.
    prog
        The command's name, for ``--version`` and the error message.
    requires
        Import names the command needs beyond the core install.
    extra
        The extra that installs them.
    argv
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        ``0`` after ``--version`` (answered here, without importing ``target``: it works
        on any install); :data:`EXIT_MISSING_EXTRA` with one line on stderr when an extra
        is missing; otherwise the exit status of ``target``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--version"]:
        print(version_line(prog))
        return 0
    module, _, function = target.partition(":")
    try:
        require(*requires, extra=extra, needed_by=prog)
        # imported only now: importing it is what would fail without the extra
        main: Callable[[Sequence[str]], int] = getattr(importlib.import_module(module), function)
        return main(args)
    except MissingExtraError as error:
        return _report(error)

"""Argparse ``type=`` callables for numbers, and the one-line error of a command line.

Shared by every command of the distribution (``dwp``, ``unet3d``): each type rejects what
the library would reject later (after minutes of reading or fitting) as an argparse usage
error that names the option, with exit status 2 before anything is read.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = [
    "error_line",
    "finite_float",
    "fraction",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number.

    ``float()`` alone takes "nan" and "inf": an infinite learning rate or weight would fail
    only at the first step, after the data are read, with NaN in every weight.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def fraction(*, low_open: bool, high_open: bool) -> Callable[[str], float]:
    """argparse type factory: a number in the interval from 0 to 1, each end open or closed.

    Examples
    --------
    >>> fraction(low_open=True, high_open=False)("1")
    1.0
    """
    interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"

    def parse(text: str) -> float:
        value = finite_float(text)
        low_ok = value > 0 if low_open else value >= 0
        high_ok = value < 1 if high_open else value <= 1
        if not (low_ok and high_ok):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    parse.__name__ = f"fraction in {interval}"  # argparse names the type in some messages
    return parse


def error_line(error: BaseException) -> str:
    """One line saying what went wrong, naming the file where there is one.

    The library's errors (file, layer and option errors) carry the whole story in their
    message; a traceback would only hide it.
    """
    if isinstance(error, OSError) and error.filename is not None:
        # "[Errno 2] No such file or directory: 'x'" -> "x: No such file or directory"
        return f"{error.filename}: {error.strerror or error}"
    lines = str(error).strip().splitlines()
    return " ".join(line.strip() for line in lines) or type(error).__name__

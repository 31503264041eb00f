"""Argument types of the ``dwp`` command line (argparse ``type=`` callables).

Each rejects what the library would reject later (after minutes of reading and fitting) as
an argparse usage error, naming the option: exit status 2 before anything is read.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from typing import Any

from ..argparse_types import (
    finite_float,
    fraction,
    non_negative_float,
    positive_float,
    positive_int,
)
from ..priors.kernel_gaussian import LEDOIT_WOLF

__all__ = [
    "api_default",
    "finite_float",
    "fraction",
    "group_rule",
    "kernel_shape",
    "non_negative_float",
    "positive_float",
    "positive_int",
    "shrinkage",
]


def api_default(function: Callable[..., Any], name: str) -> Any:
    """The default of ``function``'s parameter ``name``: help texts quote the library's own
    defaults, so an option left out means exactly what leaving the argument out means."""
    return inspect.signature(function).parameters[name].default


def kernel_shape(text: str) -> tuple[int, ...]:
    """argparse type: a kernel shape written ``3x3x3`` (1 to 3 sizes >= 1), as the kernel
    bank names resolutions."""
    parts = text.lower().split("x")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be sizes joined by 'x' (e.g. 3x3x3), got {text!r}"
        ) from None
    if not 1 <= len(sizes) <= 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"must be 1 to 3 sizes >= 1 joined by 'x' (e.g. 5x5), got {text!r}"
        )
    return sizes


def group_rule(text: str) -> tuple[str, str]:
    """argparse type: ``PATTERN=GROUP``, a glob pattern on layer names and a group name."""
    pattern, sep, group = text.partition("=")
    if not sep or not pattern or not group:
        raise argparse.ArgumentTypeError(
            f"must be PATTERN=GROUP (e.g. 'encoder.*=encoder'), got {text!r}"
        )
    return pattern, group


def shrinkage(text: str) -> float | str:
    """argparse type: ``ledoit-wolf`` or a covariance shrinkage intensity in [0, 1]."""
    if text == LEDOIT_WOLF:
        return text
    try:
        return fraction(low_open=False, high_open=False)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be {LEDOIT_WOLF!r} or a number in [0, 1], got {text!r}"
        ) from None

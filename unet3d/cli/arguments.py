"""Argument types shared by the ``unet3d`` subcommands (argparse ``type=`` callables)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = [
    "fraction",
    "init_log_sigma",
    "non_negative_int",
    "overlap",
    "positive_float",
    "positive_int",
    "rate",
    "triple",
]


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1)."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def rate(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def init_log_sigma(text: str) -> float | str:
    """argparse type: ``fan_in`` or a finite number."""
    if text == "fan_in":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'fan_in' or a number, got {text}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def overlap(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def triple(values: Sequence[int] | None) -> int | tuple[int, int, int] | None:
    """``nargs="+"`` sizes: one int for a cube, or three."""
    if values is None:
        return None
    return values[0] if len(values) == 1 else (values[0], values[1], values[2])

"""Argument types shared by the ``unet3d`` subcommands (argparse ``type=`` callables)."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when a command runs, not when the parser is built
    import torch

__all__ = [
    "check_output_folder",
    "fraction",
    "init_log_sigma",
    "non_negative_float",
    "non_negative_int",
    "overlap",
    "positive_float",
    "positive_int",
    "rate",
    "torch_device",
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


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text}") from None
    # float() takes "inf" and "nan": an infinite learning rate or weight fails only at
    # the first step, after the data are read, with NaN in every weight
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
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
        return _finite(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be 'fan_in' or a finite number, got {text}"
        ) from None


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


def torch_device(text: str) -> torch.device:
    """The torch device ``text`` (a ``--device`` value), checked to exist on this machine.

    Checked before any work: otherwise a missing GPU surfaces as a traceback from deep
    inside the first forward pass.

    Raises
    ------
    ValueError
        Not a device name, or a device this machine does not have (the message lists the
        ones it has).
    """
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise ValueError(f"--device {text}: not a torch device ({error})") from None
    available = ["cpu"]
    if torch.cuda.is_available():
        available += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        available.append("mps")
    if device.type == "cpu":
        return device
    index = 0 if device.index is None else device.index
    if f"{device.type}:{index}" not in available and device.type not in available:
        raise ValueError(
            f"--device {text} is not available on this machine (available: {', '.join(available)})"
        )
    return device


def check_output_folder(path: Path, flag: str = "--out") -> None:
    """Check that ``path`` is a writable folder or can be created as one; create nothing.

    Run before any work, so a bad ``--out`` fails in a second, not after the first image.

    Raises
    ------
    ValueError
        ``path`` is a file, lies under a file, or its nearest existing folder is not
        writable.
    """
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under the file {existing}"
        raise ValueError(f"{path}: {flag} {where}, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is" if existing == path else f"cannot be created: {existing} is"
        raise ValueError(f"{path}: {flag} {what} not writable")

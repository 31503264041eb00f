"""Command line of the ``unet3d`` application: ``unet3d train`` and ``unet3d predict``.

Also runnable as ``python -m unet3d``.

``train``
    Trains a :class:`unet3d.UNet3D` with one of the :mod:`unet3d.strategies` on a Decathlon
    folder, any folder of NIfTI files paired by name patterns, or a CSV of NIfTI files
    (:mod:`unet3d.cli.train_command`).
``predict``
    Rebuilds a trained network from its checkpoint and writes probability, mask and
    mutual-information maps of NIfTI images, a folder's searched with its subfolders
    (:mod:`unet3d.cli.predict_command`).

Argument types both share are in :mod:`unet3d.cli.arguments`.

Errors in the input (:class:`unet3d.data.DataError`, :class:`unet3d.checkpoint.CheckpointError`,
:class:`dwp.priors.deep.PriorFileError`, any :class:`dwp.LibraryFileError`, other
``ValueError`` and ``OSError``), numerical failures (``FloatingPointError``:
:class:`dwp.NonFinitePosteriorError`, :class:`dwp.NonFiniteLossError`,
:class:`dwp.DivergedLossError`) and device failures (a device this machine lacks, out of
device memory) are printed as one ``error: <message>`` line, with exit status 2; bad
command-line arguments get argparse's usage message (also status 2).  An interrupted
``train`` exits with status 130 and says how to resume.

Examples
--------
::

    unet3d train --data data/tumour --val-fraction 0.2 --strategy random_init --out runs/ri
    unet3d train --data data/tumour --val-fraction 0.2 --strategy dwp --prior prior.pt \\
        --beta 1 --out runs/dwp
    unet3d predict --checkpoint runs/dwp/best.pt --input data/tumour --samples 8 --out pred/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dwp.argparse_types import error_line
from dwp.extras import add_version_argument, exit_on_missing_extra, require

from . import predict_command, train_command

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "build_parser", "main"]

#: Exit status of an input error (the same as argparse's for bad arguments).
EXIT_ERROR = 2
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The ``unet3d`` argument parser (subcommands ``train`` and ``predict``)."""
    parser = argparse.ArgumentParser(
        prog="unet3d",
        description="3D U-Net segmentation with transfer strategies and deep weight priors.",
    )
    add_version_argument(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_command.add_parser(commands)
    predict_command.add_parser(commands)
    return parser


#: What to lower when a command runs out of device memory.
_MEMORY_HINTS = {"train": "--batch-size or --size", "predict": "--sw-batch-size or --roi"}


def _device_failure(error: RuntimeError, command: str) -> str | None:
    """The one-line message of a device failure (out of memory, a CUDA error), or ``None``
    for any other RuntimeError, which is a bug and keeps its traceback."""
    torch = sys.modules.get("torch")  # a device error implies torch was imported
    if torch is None:
        return None
    first = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, torch.OutOfMemoryError):
        hint = _MEMORY_HINTS.get(command, "the batch size")
        return f"out of device memory ({first}); lower {hint}"
    accelerator = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    if (accelerator is not None and isinstance(error, accelerator)) or first.startswith(
        "CUDA error"
    ):
        return f"device failure: {first}"
    return None


@exit_on_missing_extra  # without MONAI: one "error: ..." line naming the extra, status 2
def main(argv: Sequence[str] | None = None) -> int:
    """Run ``unet3d``; returns the exit status.

    Parameters
    ----------
    argv
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        0 on success, :data:`EXIT_ERROR` (2) for bad input and numerical or device
        failures (``error: ...`` on stderr), :data:`EXIT_INTERRUPTED` (130) after Ctrl-C.  Bad arguments raise ``SystemExit(2)``
        from argparse, as usual.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # after parsing, so that --help and --version work on a core install; SciPy: HD95
    require("monai", "scipy", extra="unet3d", needed_by="unet3d")
    args.argv = argv
    args.check(args)
    try:
        return args.handler(args)
    except (ValueError, OSError, FloatingPointError) as error:
        # DataError, CheckpointError, PriorFileError and PriorMismatchError are ValueErrors
        # whose messages name the file or layer; the FloatingPointErrors (a non-finite
        # posterior or loss, a diverged loss) name the layer or term and the fix: the
        # message is the whole story, a traceback would only hide it.
        print(f"error: {error_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except RuntimeError as error:
        message = _device_failure(error, args.command)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        hint = " (continue with --resume)" if args.command == "train" else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED

"""Argument types shared by the ``unet3d`` subcommands (argparse ``type=`` callables), the
options of a data folder searched by pattern, the training-set augmentation options and
the spatial options both commands share (``--spacing``, ``--orientation``,
``--crop-foreground``, :class:`unet3d.spatial.Spatial`).

The types check what the Python layer would otherwise refuse later under its own argument
names (``size must be ...``): argparse names the flag, with the usage line and status 2.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dwp import argparse_types as types
from dwp.argparse_types import (
    finite_float,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

if TYPE_CHECKING:  # torch is imported when a command runs, not when the parser is built
    import torch

    from ..config import Augmentation
    from ..spatial import Spatial

__all__ = [
    "AUGMENTATION_FLAGS",
    "PATTERN_FLAGS",
    "add_augmentation_options",
    "add_device_option",
    "add_pattern_options",
    "add_spatial_options",
    "augmentation_of",
    "augmentation_problem",
    "case_pattern",
    "channels",
    "check_output_folder",
    "class_count",
    "file_pattern",
    "fraction",
    "init_log_sigma",
    "label_table",
    "needs_problem",
    "non_negative_float",
    "non_negative_int",
    "orientation_codes",
    "overlap",
    "pattern_problem",
    "positive_float",
    "positive_int",
    "probability",
    "rate",
    "size_side",
    "spatial_of",
    "spatial_problem",
    "torch_device",
    "trainable_problem",
    "triple",
    "window_side",
]

#: How the messages of :func:`unet3d.cases.cases_from_patterns` name its two patterns.
PATTERN_FLAGS = ("--image-pattern", "--label-pattern")


#: argparse type: a number in (0, 1).
fraction = types.fraction(low_open=True, high_open=True)
#: argparse type: a number in (0, 1].
rate = types.fraction(low_open=True, high_open=False)
#: argparse type: a number in [0, 1].
probability = types.fraction(low_open=False, high_open=False)

#: ``unet3d train``'s augmentation options: ``--flag`` -> (argparse dest, field of
#: :class:`unet3d.config.Augmentation`, argparse type, help).
AUGMENTATION_FLAGS: dict[str, tuple[str, str, Any, str]] = {
    "--flip-prob": ("flip_prob", "flip_prob", probability, "probability of flipping each axis"),
    "--rotate-prob": ("rotate_prob", "rotate_prob", probability, "probability of a rotation"),
    "--max-rotation-deg": (
        "max_rotation_deg",
        "max_rotation_deg",
        non_negative_float,
        "rotation angles uniform in [-DEG, DEG] about each axis",
    ),
    "--intensity-prob": (
        "intensity_prob",
        "intensity_prob",
        probability,
        "probability of each of the intensity scaling and shift",
    ),
    "--intensity-scale": (
        "intensity_scale",
        "scale",
        non_negative_float,
        "intensities multiplied by 1 + u, u uniform in [-S, S]",
    ),
    "--intensity-shift": (
        "intensity_shift",
        "shift",
        non_negative_float,
        "then shifted by u uniform in [-S, S] (min-max images are in [0, 1])",
    ),
}


def class_count(text: str) -> int:
    """argparse type: an int >= 2 (background and at least one class: softmax needs two)."""
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"must be at least 2 (the background and one class), got {text}"
        )
    return value


def size_side(text: str) -> int:
    """argparse type: a side of ``unet3d train --size``, a positive multiple of 8 (the
    U-Net's three stride-2 levels; :func:`unet3d.preprocess.target_size`)."""
    from ..model import SIZE_DIVISOR

    value = int(text)
    if value < 1 or value % SIZE_DIVISOR:
        raise argparse.ArgumentTypeError(
            f"must be a positive multiple of {SIZE_DIVISOR}, got {text}"
        )
    return value


def channels(text: str) -> int | tuple[int, ...]:
    """argparse type: ``--modality`` / ``--modalities``, one channel (``2``, an int) or
    several, comma-separated and distinct (``0,2``, a tuple)."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(
            f"must be a channel index >= 0 or distinct ones separated by commas (e.g. 0,2), "
            f"got {text!r}"
        )
    return values[0] if len(values) == 1 else values


def label_table(text: str) -> dict[int, int]:
    """argparse type: ``--label-map``, comma-separated ``FROM:TO`` pairs of label values
    (``1:1,2:1,4:1``: BraTS's whole tumour); each FROM once."""
    table: dict[int, int] = {}
    try:
        for pair in text.split(","):
            source, target = (int(v) for v in pair.split(":"))
            if source < 0 or target < 0 or source in table:
                raise ValueError(pair)
            table[source] = target
    except ValueError:
        raise argparse.ArgumentTypeError(
            "must be FROM:TO pairs of label values >= 0 separated by commas, each FROM once "
            f"(e.g. 1:1,2:1,4:1), got {text!r}"
        ) from None
    return table


def orientation_codes(text: str) -> str:
    """argparse type: ``--orientation``, three axis codes (``RAS``;
    :class:`unet3d.spatial.Spatial`)."""
    from ..spatial import Spatial

    try:
        return str(Spatial(orientation=text).orientation)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("orientation ")) from None


def window_side(text: str) -> int:
    """argparse type: a side of ``unet3d predict --roi``, a multiple of 8 and at least 16
    (:func:`unet3d.inference.predict_volume`'s ``roi_size``)."""
    from ..inference import MIN_ROI
    from ..model import SIZE_DIVISOR

    value = int(text)
    if value < MIN_ROI or value % SIZE_DIVISOR:
        raise argparse.ArgumentTypeError(
            f"must be a multiple of {SIZE_DIVISOR}, at least {MIN_ROI}, got {text}"
        )
    return value


def case_pattern(text: str) -> str:
    """argparse type: a file pattern with ``{id}`` (:mod:`unet3d.patterns`)."""
    from ..patterns import check_pattern

    try:
        check_pattern(text, "the pattern")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def file_pattern(text: str) -> str:
    """argparse type: a file pattern, ``{id}`` optional (:mod:`unet3d.patterns`)."""
    from ..patterns import check_pattern

    try:
        check_pattern(text, "the pattern", needs_id=False)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def init_log_sigma(text: str) -> float | str:
    """argparse type: ``fan_in`` or a finite number."""
    if text == "fan_in":
        return text
    try:
        return finite_float(text)
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
    from ..devices import resolve_device  # the check TrainConfig.device gets too

    return resolve_device(text, "--device")


def add_device_option(group: Any) -> None:
    """Add ``unet3d train``'s ``--device`` and ``--amp`` to ``group``, an argparse parser or argument
    group; the command checks it with :func:`torch_device` when it runs (torch is not
    imported to build the parser)."""
    group.add_argument(
        "--device",
        default="cpu",
        help="where to train: cpu (default), cuda, cuda:N or mps; under torchrun each "
        "process of a cuda run uses cuda:LOCAL_RANK.  Not part of the run: --resume may "
        "continue it on another device",
    )
    group.add_argument(
        "--amp",
        choices=("off", "bf16", "fp16"),
        default="off",
        help="mixed precision: the forward pass in bfloat16 (cpu, Ampere+ GPUs) or float16 "
        "(cuda, with a loss scale); the KL, the posterior's log-scales and the ELBO stay "
        "float32 (default off: float32 throughout)",
    )


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


def add_pattern_options(group: Any) -> None:
    """Add ``--image-pattern`` / ``--label-pattern`` (``unet3d train``) to ``group``, an
    argparse parser or argument group."""
    group.add_argument(
        "--image-pattern",
        type=case_pattern,
        metavar="PATTERN",
        help="with --data DIR (and --val-data): DIR is any folder, its images the files "
        "matching PATTERN (relative to DIR; glob * ? [...], ** for any depth) and {id} "
        "the case id, e.g. '{id}_t1.nii.gz', 'images/{id}.nii.gz', '*/{id}_flair.nii.gz', "
        "'{id}/{id}_flair.nii.gz'",
    )
    group.add_argument(
        "--label-pattern",
        type=case_pattern,
        metavar="PATTERN",
        help="with --image-pattern: the label of case {id}, e.g. '{id}_seg.nii.gz', "
        "'labels/{id}.nii.gz' (files it matches are never images)",
    )


def pattern_problem(args: argparse.Namespace) -> str | None:
    """The usage error of ``--image-pattern`` / ``--label-pattern`` with the other data
    options, or ``None``."""
    image, label = args.image_pattern, args.label_pattern
    if image is None and label is None:
        return None
    if image is None or label is None:
        return "--image-pattern and --label-pattern go together"
    if args.data is None:
        return "--image-pattern needs --data DIR (the folder the patterns search)"
    if image == label:
        return f"--image-pattern and --label-pattern are the same: {image!r}"
    if not args.binarise and args.n_classes is None and getattr(args, "label_map", None) is None:
        return (
            "--image-pattern with --no-binarise needs --n-classes or --label-map (no "
            "dataset.json here)"
        )
    return None


def trainable_problem(blocks: Sequence[str]) -> str | None:
    """The usage error of ``--trainable`` blocks that name no parameter of the U-Net, or
    ``None``.  :class:`~unet3d.strategies.PretrainedFrozenStrategy` finds out only once
    training starts, and only when none of them matches: a typo would train too little."""
    from ..model import UNet3D
    from ..strategies import block_names

    model = UNet3D(1, 2, (1, 1, 1, 1))  # the names do not depend on the widths
    names = [name for name, _ in model.named_parameters()]
    unknown = [b for b in blocks if not any(n == b or n.startswith(b + ".") for n in names)]
    if not unknown:
        return None
    return (
        f"--trainable {' '.join(unknown)}: no such block of the U-Net (blocks: "
        f"{' '.join(block_names(model))})"
    )


def add_augmentation_options(parser: Any) -> None:
    """Add ``--augment`` and the :data:`AUGMENTATION_FLAGS` (``unet3d train``) to ``parser``
    as an argument group of their own."""
    from ..config import Augmentation

    defaults = Augmentation()
    group = parser.add_argument_group("augmentation (of the training volumes only)")
    group.add_argument(
        "--augment",
        action="store_true",
        help="random flips, small rotations and intensity changes of the training volumes "
        "(MONAI), drawn anew each epoch from --seed; validation volumes are never augmented "
        "(default: off, as the paper).  The options below tune it and are an error without "
        "--augment",
    )
    metavars = {"--max-rotation-deg": "DEG", "--intensity-scale": "S", "--intensity-shift": "S"}
    for flag, (dest, field, kind, text) in AUGMENTATION_FLAGS.items():
        group.add_argument(
            flag,
            dest=dest,
            type=kind,
            metavar=metavars.get(flag, "P"),
            help=f"with --augment: {text} (default {getattr(defaults, field):g})",
        )


def augmentation_problem(args: argparse.Namespace) -> str | None:
    """The usage error of augmentation options given without ``--augment``, or ``None``."""
    given = [
        flag for flag, (dest, *_) in AUGMENTATION_FLAGS.items() if getattr(args, dest) is not None
    ]
    return None if args.augment else needs_problem(given, "--augment")


def needs_problem(given: Sequence[str], needed: str) -> str | None:
    """The usage error of the options ``given`` without the option ``needed`` they tune,
    or ``None`` when none is given."""
    if not given:
        return None
    return f"{' '.join(given)} need{'s' if len(given) == 1 else ''} {needed}"


def augmentation_of(args: argparse.Namespace) -> Augmentation | None:
    """The :class:`unet3d.config.Augmentation` of ``--augment`` and the options given (the
    others at their defaults), ``None`` without ``--augment``."""
    from ..config import Augmentation

    if not args.augment:
        return None
    given = {field: getattr(args, dest) for dest, field, *_ in AUGMENTATION_FLAGS.values()}
    return Augmentation(**{k: v for k, v in given.items() if v is not None})


def add_spatial_options(group: Any, *, predict: bool = False) -> None:
    """Add ``--spacing``, ``--orientation`` and ``--crop-foreground`` to ``group``, an
    argparse parser or argument group; for ``unet3d predict`` (``predict``) their defaults
    are the training run's and ``--no-crop-foreground`` turns the crop off."""
    default = " (default: the training run's)" if predict else ""
    group.add_argument(
        "--spacing",
        type=positive_float,
        nargs="+",
        metavar="MM",
        help="resample every volume to this voxel size in mm, one number or 3 along the "
        "array axes after --orientation (trilinear, labels nearest)"
        + (default or " (default: the file's)"),
    )
    group.add_argument(
        "--orientation",
        type=orientation_codes,
        metavar="CODES",
        help="reorient every volume so that its array axes point as the codes say, one of "
        "each pair L/R, P/A, I/S, e.g. RAS" + (default or " (default: the file's voxel order)"),
    )
    group.add_argument(
        "--crop-foreground",
        action=argparse.BooleanOptionalAction if predict else "store_true",
        default=None if predict else False,
        help="crop every volume to the box of its voxels above the background (any channel "
        "above its minimum: the brain of a skull-stripped scan)" + default,
    )


def spatial_problem(args: argparse.Namespace) -> str | None:
    """The usage error of a ``--spacing`` with other than 1 or 3 values, or ``None``."""
    if args.spacing is not None and len(args.spacing) not in (1, 3):
        return f"--spacing takes 1 or 3 values, got {len(args.spacing)}"
    return None


def spatial_of(args: argparse.Namespace, trained: dict[str, Any] | None = None) -> Spatial:
    """The :class:`unet3d.spatial.Spatial` of the spatial options; those not given take the
    ``trained`` config's values (``unet3d predict``), else the defaults."""
    from ..spatial import Spatial

    config = trained or {}
    spacing = config.get("spacing") if args.spacing is None else args.spacing
    orientation = config.get("orientation") if args.orientation is None else args.orientation
    crop = args.crop_foreground
    return Spatial(
        spacing=None if spacing is None else tuple(spacing),
        orientation=orientation,
        crop_foreground=bool(config.get("crop_foreground", False) if crop is None else crop),
    )

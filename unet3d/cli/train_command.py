"""``unet3d train``: train a U-Net with one of the strategies on NIfTI data.

Trains a :class:`unet3d.UNet3D` with one of the :mod:`unet3d.strategies` on NIfTI data in
the Medical Segmentation Decathlon layout (``--data``), in any folder paired by file name
patterns (``--data`` with ``--image-pattern`` / ``--label-pattern``,
:func:`unet3d.cases.cases_from_patterns`) or listed in a CSV (``--csv``), through
:func:`unet3d.train.train`.  Validation data come from a second folder / table
(``--val-data`` / ``--val-csv``) or a seeded share of the training cases
(``--val-fraction``).  ``--augment`` (tuned by ``--flip-prob`` ... ``--intensity-shift``)
augments the training volumes, never the validation ones (``TrainConfig.augmentation``).
``--out`` receives what :func:`~unet3d.train.train` writes
(``metrics.csv``, ``metrics.json``, ``best.pt``, ``last.pt``) and ``config.json``: the
command, the training config, the strategy, the cases used and a fingerprint of their
files (:mod:`unet3d.fingerprint`).  ``--resume`` continues an interrupted run with the same
result as an uninterrupted one; it refuses other settings, data, split or cases than the
run's (naming what changed).  A new run refuses an ``--out`` holding another run's files
unless ``--overwrite`` replaces them (:mod:`unet3d.run_files`).  Every step is logged to
``steps.csv`` and drawn in ``curves.png`` in ``--out``, and with ``--tensorboard DIR`` to
TensorBoard (:class:`unet3d.run_files.RunLog`).  ``--device`` is where it computes.

The heavy modules (torch, MONAI) are imported when the command runs, not when the parser
is built, so that ``--help`` stays quick.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .arguments import PATTERN_FLAGS, augmentation_of, spatial_of, torch_device, triple
from .run_folder import RESUME_FREE, check_new_run, check_resume, data_source
from .train_options import STRATEGY_FLAGS, STRATEGY_NAMES, add_train_options, check_train_args

if TYPE_CHECKING:
    from ..config import TrainConfig

__all__ = ["RESUME_FREE", "STRATEGY_FLAGS", "STRATEGY_NAMES", "add_parser", "run"]


def add_parser(commands: Any) -> None:
    """Add ``unet3d train`` to the subcommands ``commands`` (its options:
    :mod:`unet3d.cli.train_options`)."""
    train = commands.add_parser(
        "train",
        help="train a U-Net with one of the strategies",
        description="Train unet3d.UNet3D on NIfTI data (unet3d.train.train).",
    )
    add_train_options(train)
    train.set_defaults(handler=run, check=check_train_args, usage_error=train.error)


def _strategy_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of the strategy from the flags given (defaults are the strategy's)."""
    import dwp

    options: dict[str, Any] = {}
    for dest, field in STRATEGY_FLAGS.values():
        value = getattr(args, dest)
        if value is not None and field not in ("beta", "source", "prior_path"):
            options[field] = list(value) if isinstance(value, list) else value
    # absolute paths: the run (and its --resume) may be started from another folder
    if args.source is not None:
        options["source"] = str(args.source.resolve())
    if args.prior is not None:
        options["prior_path"] = str(args.prior.resolve())
    if args.beta_schedule is not None:
        options["beta"] = dwp.KLSchedule(
            args.beta_schedule,
            start=0.0 if args.beta_start is None else args.beta_start,
            end=1.0 if args.beta is None else args.beta,
            steps=1000 if args.beta_steps is None else args.beta_steps,
        )
    elif args.beta is not None:
        options["beta"] = args.beta
    return options


def _split_cases(cases: list, share: float, seed: int) -> tuple[list, list]:
    """A seeded ``(train, validation)`` split, each in the original order."""
    import numpy as np

    n_val = max(1, round(share * len(cases)))
    if n_val >= len(cases):
        raise ValueError(f"--val-fraction {share} leaves no training case out of {len(cases)}")
    chosen = set(np.random.default_rng(seed).permutation(len(cases))[:n_val].tolist())
    return (
        [c for i, c in enumerate(cases) if i not in chosen],
        [c for i, c in enumerate(cases) if i in chosen],
    )


def _check_source(path: Path, config: TrainConfig) -> None:
    """Fail before training, naming the file, when a source checkpoint does not fit."""
    from ..checkpoint import load_source
    from ..model import UNet3D

    model = UNet3D(config.in_channels, config.n_classes, config.widths, out_bias=config.out_bias)
    load_source(model, path, advice="pass the source run's --widths (and --out-bias)")


def _cases(args: argparse.Namespace) -> tuple[list, list | None, int | None]:
    """Training and validation cases, and the number of classes ``dataset.json`` declares
    (``None`` for a CSV or a folder searched by pattern)."""
    from ..data import cases_from_patterns, decathlon_labels, load_csv, load_decathlon

    def folder(root: Path) -> list:  # a Decathlon folder, or any folder with the patterns
        if args.image_pattern is None:
            return load_decathlon(root, "train")
        patterns = (args.image_pattern, args.label_pattern)
        return cases_from_patterns(root, *patterns, names=PATTERN_FLAGS)

    if args.data is not None:
        cases = folder(args.data)
        declared = None if args.image_pattern else len(decathlon_labels(args.data))
    else:
        cases = load_csv(args.csv, split=args.split)
        declared = None
    if args.val_data is not None:
        val_cases = folder(args.val_data)
    elif args.val_csv is not None:
        val_cases = load_csv(args.val_csv, split=args.val_split)
    elif args.val_fraction is not None:
        cases, val_cases = _split_cases(cases, args.val_fraction, args.seed)
    else:
        val_cases = None
    return cases, val_cases, declared


def _case_record(case: Any) -> dict[str, Any]:
    return {"id": case.id, "image": str(case.image), "label": str(case.label)}


def run(args: argparse.Namespace) -> int:
    """Run ``unet3d train`` with parsed arguments; returns the exit status (0)."""
    from dwp.amp import check_precision
    from dwp.io import write_json
    from dwp.train_log import check_tensorboard

    # unet3d.train.train is looked up now, not at import: tests replace it
    from .. import train as training
    from ..config import TrainConfig
    from ..fingerprint import data_fingerprint
    from ..preprocess import check_cases
    from ..strategies import get_strategy
    from ..train_data import as_dataset

    device = torch_device(args.device)  # a missing GPU: one line, before any data is read
    check_precision(args.amp, device, "--amp")  # e.g. fp16 on the CPU: the same
    for flag, path in (("--source", args.source), ("--prior", args.prior)):
        if path is not None and not path.is_file():  # before any data is read
            raise ValueError(f"{path}: file not found ({flag})")
    if args.tensorboard is not None:  # TensorBoard installed, DIR writable: before any work
        check_tensorboard(args.tensorboard, needed_by="--tensorboard")
    cases, val_cases, declared = _cases(args)
    items = len(cases) * (args.patches_per_volume or 1)
    if args.batch_size > items:  # train() would refuse it after config.json is written
        what = "training cases" if items == len(cases) else "training patches per epoch"
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {items} {what}")
    label_map = args.label_map
    if args.binarise:
        n_classes = 2
    elif args.n_classes is not None:
        n_classes = args.n_classes
    else:  # a label table says how many classes it makes
        n_classes = max(label_map.values()) + 1 if label_map else declared
    # labels are checked against the declared classes (before the table or binarising),
    # naming the file
    classes = declared if args.binarise or label_map else n_classes

    normalise = None if args.normalise == "none" else args.normalise
    # every file's header now, validation ones included (first read after the training
    # epochs otherwise): a missing or mismatched file fails in seconds, named
    in_channels = check_cases(cases + (val_cases or []), args.modality, normalise)
    spatial = spatial_of(args)

    options = _strategy_options(args)
    config = TrainConfig(
        strategy=args.strategy,
        strategy_options=options,
        out_dir=args.out,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        scale_rate=args.scale_rate,
        lr_patience=args.lr_patience,
        min_lr=args.min_lr,
        val_every=args.val_every,
        restarts=args.restarts,
        swag_rank=args.swag_rank,
        swag_start=args.swag_start,
        swag_every=args.swag_every,
        seed=args.seed,
        in_channels=in_channels,
        n_classes=n_classes,
        widths=tuple(args.widths),
        out_bias=args.out_bias,
        size=triple(args.size),
        binarise=args.binarise,
        modality=args.modality,
        normalise=normalise,
        label_map=label_map,
        spacing=spatial.spacing,
        orientation=spatial.orientation,
        crop_foreground=spatial.crop_foreground,
        patch_size=triple(args.patch_size),
        pos_fraction=0.5 if args.pos_fraction is None else args.pos_fraction,
        patches_per_volume=args.patches_per_volume or 1,
        augmentation=augmentation_of(args),  # the training set's only
        progress=args.progress,
        tensorboard=args.tensorboard,
        device=str(device),
        amp=args.amp,
    )
    train_set = as_dataset(cases, config, training=True, classes=classes)
    val_set = None if val_cases is None else as_dataset(val_cases, config, False, classes)
    train_set[0]  # reading the first case (and maybe a patch of it) checks it early
    strategy = get_strategy(args.strategy, **options)
    if args.source is not None:
        _check_source(args.source, config)
    plain = json.loads(json.dumps(config.as_dict()))
    data = data_fingerprint(data_source(args), cases, val_cases)
    # every check before config.json is written: a refused run leaves the folder as it was
    if args.resume:
        check_resume(args.out, plain, data)
    else:
        check_new_run(args.out, overwrite=args.overwrite)

    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": shlex.join(["unet3d", *args.argv]),
        "config": plain,
        "strategy": json.loads(json.dumps(strategy.describe(), default=repr)),
        "train_cases": [_case_record(c) for c in cases],
        "val_cases": None if val_cases is None else [_case_record(c) for c in val_cases],
        "data": data,
    }
    write_json(args.out / "config.json", record)

    result = training.train(
        config,
        train_set,
        val_set,
        resume=args.resume,
        overwrite=args.overwrite,
        strategy=strategy,
    )
    last = result.history[-1] if result.history else {}
    summary = f"{len(result.history)} epochs ({result.stop_reason})"
    if result.best_epoch >= 0:
        summary += f", best epoch {result.best_epoch}: val_loss {result.best_val_loss:.4g}"
    elif "train_loss" in last:
        summary += f", train_loss {last['train_loss']:.4g}"
    print(f"{summary}; wrote {args.out}", file=sys.stderr)
    return 0

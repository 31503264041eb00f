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
import dataclasses
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .arguments import (
    PATTERN_FLAGS,
    add_augmentation_options,
    add_device_option,
    add_pattern_options,
    augmentation_of,
    augmentation_problem,
    class_count,
    fraction,
    init_log_sigma,
    non_negative_float,
    non_negative_int,
    pattern_problem,
    positive_float,
    positive_int,
    rate,
    size_side,
    torch_device,
    trainable_problem,
    triple,
)
from .run_folder import RESUME_FREE, check_new_run, check_resume, data_source

__all__ = ["RESUME_FREE", "STRATEGY_FLAGS", "STRATEGY_NAMES", "add_parser", "run"]

STRATEGY_NAMES = (
    "random_init",
    "pretrained",
    "pretrained_frozen",
    "l2_sp",
    "normal_prior",
    "dwp",
    "prior",
)
#: ``--flag`` -> (argparse dest, field of the strategy dataclass it sets).  A flag given for
#: a strategy without that field is an argument error, not silently ignored.
STRATEGY_FLAGS: dict[str, tuple[str, str]] = {
    "--source": ("source", "source"),
    "--freeze-depth": ("freeze_depth", "freeze_depth"),
    "--trainable": ("trainable", "trainable"),
    "--prior": ("prior", "prior_path"),
    "--alpha": ("alpha", "alpha"),
    "--init": ("init", "init"),
    "--beta": ("beta", "beta"),
    "--beta-schedule": ("beta_schedule", "beta"),
    "--beta-start": ("beta_start", "beta"),
    "--beta-steps": ("beta_steps", "beta"),
    "--learn-scale": ("learn_scale", "learn_scale"),
    "--scale-lr": ("scale_lr", "scale_lr"),
    "--init-log-sigma": ("init_log_sigma", "init_log_sigma"),
    "--estimator": ("estimator", "estimator"),
    "--mode": ("mode", "mode"),
    "--ce-weight": ("ce_weight", "ce_weight"),
    "--dice-weight": ("dice_weight", "dice_weight"),
}


# ---------------------------------------------------------------------------------------------
# Arguments


def add_parser(commands: Any) -> None:
    """Add ``unet3d train`` to the subcommands ``commands``."""
    train = commands.add_parser(
        "train",
        help="train a U-Net with one of the strategies",
        description="Train unet3d.UNet3D on NIfTI data (unet3d.train.train).",
    )
    data = train.add_argument_group("data")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="Decathlon folder (training), or any folder with --image-pattern",
    )
    source.add_argument("--csv", type=Path, metavar="FILE", help="CSV of image / label paths")
    add_pattern_options(data)
    data.add_argument(
        "--split",
        metavar="NAME",
        help="with --csv: keep the rows whose 'split' column is NAME (default: every row)",
    )
    val = data.add_mutually_exclusive_group()
    val.add_argument("--val-data", type=Path, metavar="DIR", help="Decathlon folder for validation")
    val.add_argument(
        "--val-csv", type=Path, metavar="FILE", help="CSV of validation image / label paths"
    )
    val.add_argument(
        "--val-fraction",
        type=fraction,
        metavar="F",
        help="validate on this share of the training cases (seeded by --seed)",
    )
    data.add_argument(
        "--val-split", metavar="NAME", help="with --val-csv: keep the rows of this split"
    )
    data.add_argument(
        "--size",
        type=size_side,
        nargs="+",
        metavar="N",
        help="crop / pad every volume to N^3 (or D H W), multiples of 8 (default: each "
        "volume padded to the next multiple of 8; cases must then share a shape)",
    )
    data.add_argument(
        "--modality", type=non_negative_int, help="channel of 4D images to use (default: all)"
    )
    data.add_argument(
        "--no-binarise",
        dest="binarise",
        action="store_false",
        help="keep every label class (default: labels > 0 become 1, the whole tumour)",
    )
    data.add_argument(
        "--n-classes",
        type=class_count,
        help="output classes (default 2, or with --no-binarise the classes of dataset.json)",
    )
    data.add_argument(
        "--normalise",
        choices=("minmax", "zscore", "none"),
        default="minmax",
        help="intensity normalisation (default minmax, as the paper)",
    )
    add_augmentation_options(train)

    strategy = train.add_argument_group("strategy (options apply to the strategies named)")
    strategy.add_argument("--strategy", choices=STRATEGY_NAMES, default="random_init")
    strategy.add_argument(
        "--source",
        type=Path,
        metavar="CKPT",
        help="source checkpoint (pretrained, pretrained_frozen, l2_sp; dwp, prior: initial means)",
    )
    strategy.add_argument(
        "--freeze-depth",
        type=non_negative_int,
        help="pretrained_frozen: blocks trained at each end (default 1)",
    )
    strategy.add_argument(
        "--trainable",
        nargs="+",
        metavar="BLOCK",
        help="pretrained_frozen: the blocks to train instead of --freeze-depth",
    )
    strategy.add_argument(
        "--prior",
        type=Path,
        metavar="FILE",
        help="dwp: DeepWeightPrior file; prior: any prior file, e.g. a kernel Gaussian or "
        "SWAG prior (required)",
    )
    strategy.add_argument(
        "--alpha",
        type=float,
        help="l2_sp: strength of the pull alpha / 2 * ||w - w_source||^2 (default 0.01)",
    )
    strategy.add_argument(
        "--init",
        choices=("pretrained", "prior", "fresh"),
        help="normal_prior, dwp: posterior means from the weights / prior samples / fresh",
    )
    strategy.add_argument(
        "--learn-scale",
        action="store_const",
        const=True,
        help="normal_prior, dwp, prior: learn the prior's strength by empirical Bayes (a "
        "scale factor per group, logged as train_prior_scale:<site>)",
    )
    strategy.add_argument(
        "--beta",
        type=non_negative_float,
        help="normal_prior, dwp: KL weight (default 1; schedule end)",
    )
    strategy.add_argument(
        "--beta-schedule",
        choices=("constant", "linear", "cosine", "log_linear"),
        help="normal_prior, dwp: anneal the KL weight from --beta-start to --beta",
    )
    strategy.add_argument(
        "--beta-start",
        type=non_negative_float,
        help="normal_prior, dwp: KL weight at step 0 (default 0)",
    )
    strategy.add_argument(
        "--beta-steps",
        type=positive_int,
        help="normal_prior, dwp: length of the KL ramp in steps (default 1000)",
    )
    strategy.add_argument(
        "--scale-lr",
        type=positive_float,
        help="normal_prior, dwp with --optimizer adam/sgd: learning rate of the posterior "
        "log-sigmas (default lr / 10)",
    )
    strategy.add_argument(
        "--init-log-sigma",
        type=init_log_sigma,
        help="normal_prior, dwp: initial log-sigma, a number or fan_in (default fan_in: "
        "sigma = 0.1 * sqrt(2 / fan_in))",
    )
    strategy.add_argument(
        "--estimator",
        choices=("reparam", "local_reparam", "flipout"),
        help="normal_prior, dwp: gradient estimator (default reparam)",
    )
    strategy.add_argument(
        "--mode",
        choices=("auto", "sample", "mean"),
        help="normal_prior, dwp: weight noise in training (default auto: sample)",
    )
    strategy.add_argument(
        "--ce-weight",
        type=non_negative_float,
        help="cross-entropy weight (default 0.01; per voxel in the ELBO)",
    )
    strategy.add_argument(
        "--dice-weight",
        type=non_negative_float,
        help="Dice weight (default 1 for the deterministic strategies; 1e-3 per voxel in the "
        "Bayesian ones' summed ELBO, see unet3d.losses)",
    )

    optim = train.add_argument_group("training")
    optim.add_argument("--epochs", type=positive_int, default=100, help="(default 100)")
    optim.add_argument("--lr", type=positive_float, default=1e-3, help="(default 1e-3)")
    optim.add_argument("--batch-size", type=positive_int, default=2, help="(default 2)")
    optim.add_argument(
        "--optimizer",
        choices=("auto", "natural", "adam", "sgd"),
        default="auto",
        help="auto (default): natural for normal_prior / dwp (Adam on the means, natural-"
        "gradient steps on the posterior scales), adam for the others",
    )
    optim.add_argument(
        "--scale-rate",
        type=rate,
        default=0.1,
        help="natural: rate of the natural-gradient step on the posterior scales (default 0.1)",
    )
    optim.add_argument(
        "--lr-patience",
        type=non_negative_int,
        default=10,
        help="ReduceLROnPlateau patience in validations (default 10)",
    )
    optim.add_argument(
        "--val-every",
        type=positive_int,
        default=1,
        help="validate every N epochs and at the end of each cycle (default 1)",
    )
    optim.add_argument(
        "--min-lr",
        type=positive_float,
        default=1e-6,
        help="learning-rate floor that ends a cycle (default 1e-6)",
    )
    optim.add_argument(
        "--restarts",
        type=non_negative_int,
        default=0,
        help="cyclical restarts (source training for the prior; default 0)",
    )
    optim.add_argument(
        "--swag-rank",
        type=non_negative_int,
        default=0,
        help="collect SWAG moments with this many deviation columns into DIR/swag.pt, the "
        "source of a SWAG prior (default 0: off; Pre-Train Your Loss uses 5)",
    )
    optim.add_argument(
        "--swag-start",
        type=non_negative_int,
        default=0,
        help="with --swag-rank: first epoch (of each cycle) to collect from (default 0)",
    )
    optim.add_argument(
        "--swag-every",
        type=positive_int,
        default=1,
        help="with --swag-rank: a snapshot every N optimisation steps (default 1)",
    )
    optim.add_argument("--seed", type=non_negative_int, default=0, help="(default 0)")
    add_device_option(optim)
    optim.add_argument(
        "--widths",
        type=positive_int,
        nargs=4,
        default=[16, 32, 32, 64],
        metavar="W",
        help="U-Net channel widths (default 16 32 32 64, the paper's)",
    )

    out = train.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, metavar="DIR", help="run folder")
    start = out.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from DIR/last.pt")
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in DIR (its checkpoints, metrics, config.json); without it "
        "or --resume, a DIR holding a run is refused",
    )
    out.add_argument(
        "--tensorboard",
        type=Path,
        metavar="DIR",
        help="also log every step's loss terms, KL weight, learning rates and posterior "
        "log-sigmas, and the validation metrics, as TensorBoard events in DIR (needs "
        'pip install "dwp[tensorboard]"; --out gets steps.csv and curves.png either way)',
    )
    out.add_argument("--no-progress", dest="progress", action="store_false")
    train.set_defaults(handler=run, check=_check_args, usage_error=train.error)


def _check_args(args: argparse.Namespace) -> None:
    """Argument errors argparse cannot see: options of other strategies, combinations."""
    from ..strategies import STRATEGIES

    error = args.usage_error  # the subcommand's usage line and exit status 2
    fields = {f.name for f in dataclasses.fields(STRATEGIES[args.strategy]) if f.init}
    for flag, (dest, field) in STRATEGY_FLAGS.items():
        if getattr(args, dest) is not None and field not in fields:
            error(f"{flag} does not apply to --strategy {args.strategy}")
    if args.strategy in ("pretrained", "pretrained_frozen", "l2_sp") and args.source is None:
        error(f"--strategy {args.strategy} needs --source CKPT")
    if args.strategy in ("dwp", "prior") and args.prior is None:
        error(f"--strategy {args.strategy} needs --prior FILE")
    if args.alpha is not None and not 0 <= args.alpha < float("inf"):
        error(f"--alpha must be a finite number >= 0, got {args.alpha}")
    if args.trainable is not None and args.freeze_depth is not None:
        error("give --freeze-depth or --trainable, not both")
    schedule_parts = (args.beta_start, args.beta_steps)
    if args.beta_schedule is None and any(v is not None for v in schedule_parts):
        error("--beta-start and --beta-steps need --beta-schedule")
    if args.split is not None and args.csv is None:
        error("--split needs --csv")
    if args.val_split is not None and args.val_csv is None:
        error("--val-split needs --val-csv")
    if args.size is not None and len(args.size) not in (1, 3):
        error(f"--size takes 1 or 3 values, got {len(args.size)}")
    if args.size is not None and max(args.size) == 8:  # else the first forward pass fails
        error("--size 8 leaves the U-Net one voxel at 1/8 resolution; make a side >= 16")
    trainable = args.trainable and trainable_problem(args.trainable)
    for problem in (pattern_problem(args), augmentation_problem(args), trainable):
        if problem:
            error(problem)
    if args.binarise and args.n_classes not in (None, 2):
        error("--n-classes other than 2 needs --no-binarise")
    if not args.binarise and args.csv is not None and args.n_classes is None:
        error("--csv with --no-binarise needs --n-classes")


# ---------------------------------------------------------------------------------------------
# Running


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


def _check_source(path: Path, in_channels: int, n_classes: int, widths: Sequence[int]) -> None:
    """Fail before training, naming the file, when a source checkpoint does not fit."""
    from ..checkpoint import load_source
    from ..model import UNet3D

    load_source(
        UNet3D(in_channels, n_classes, widths), path, advice="pass the source run's --widths"
    )


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
    from dwp.io import write_json
    from dwp.train_log import check_tensorboard

    # unet3d.train.train is looked up now, not at import: tests replace it
    from .. import train as training
    from ..config import Augmentation, TrainConfig
    from ..data import SegmentationDataset
    from ..fingerprint import data_fingerprint
    from ..preprocess import check_cases
    from ..strategies import get_strategy

    device = torch_device(args.device)  # a missing GPU: one line, before any data is read
    for flag, path in (("--source", args.source), ("--prior", args.prior)):
        if path is not None and not path.is_file():  # before any data is read
            raise ValueError(f"{path}: file not found ({flag})")
    if args.tensorboard is not None:  # TensorBoard installed, DIR writable: before any work
        check_tensorboard(args.tensorboard, needed_by="--tensorboard")
    cases, val_cases, declared = _cases(args)
    if args.batch_size > len(cases):  # train() would refuse it after config.json is written
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(cases)} training cases")
    if args.binarise:
        n_classes = 2
    else:
        n_classes = args.n_classes if args.n_classes is not None else declared
    # labels are checked against the declared classes (before binarising), naming the file
    classes = declared if args.binarise else n_classes

    normalise = None if args.normalise == "none" else args.normalise
    size = triple(args.size)
    # every file's header now, validation ones included (first read after the training
    # epochs otherwise): a missing or mismatched file fails in seconds, named
    check_cases(cases + (val_cases or []), args.modality, normalise)

    augmentation = augmentation_of(args)  # the training set's only

    def dataset(items: list, augment: Augmentation | None = None) -> SegmentationDataset:
        return SegmentationDataset(
            items,
            normalise=normalise,
            modality=args.modality,
            binarise=args.binarise,
            classes=classes,
            size=size,
            augment=augment or False,
            seed=args.seed,
            cache=True,
        )

    train_set = dataset(cases, augmentation)
    val_set = None if val_cases is None else dataset(val_cases)
    # Reading the first case checks it early and gives the channel count of 4D images.
    in_channels = int(train_set[0]["image"].shape[0])

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
        size=size,
        binarise=args.binarise,
        modality=args.modality,
        normalise=normalise,
        augmentation=augmentation,
        progress=args.progress,
        tensorboard=args.tensorboard,
        device=str(device),
    )
    strategy = get_strategy(args.strategy, **options)
    if args.source is not None:
        _check_source(args.source, in_channels, n_classes, config.widths)
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

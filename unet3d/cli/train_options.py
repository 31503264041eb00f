"""The options of ``unet3d train``: their definitions (:func:`add_train_options`) and the
checks of their combinations that argparse cannot make (:func:`check_train_args`).

The argparse types they use are :mod:`unet3d.cli.arguments`'s; :mod:`unet3d.cli.train_command`
builds the subcommand from these and runs it.  Nothing heavy (torch, MONAI) is imported to
build the parser.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .arguments import (
    add_augmentation_options,
    add_device_option,
    add_pattern_options,
    add_spatial_options,
    augmentation_problem,
    channels,
    class_count,
    fraction,
    init_log_sigma,
    label_table,
    needs_problem,
    non_negative_float,
    non_negative_int,
    pattern_problem,
    positive_float,
    positive_int,
    probability,
    rate,
    size_side,
    spatial_problem,
    trainable_problem,
    window_side,
)

__all__ = ["STRATEGY_FLAGS", "STRATEGY_NAMES", "add_train_options", "check_train_args"]

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


def add_train_options(train: argparse.ArgumentParser) -> None:
    """Add every option of ``unet3d train`` to its parser ``train``, in groups."""
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
        "--modality",
        "--modalities",
        dest="modality",
        type=channels,
        metavar="K[,K...]",
        help="channel(s) of 4D images to use, in this order, e.g. 1 or 0,2 (default: all)",
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
    data.add_argument(
        "--label-map",
        type=label_table,
        metavar="FROM:TO,...",
        help="map label values by this table before --no-binarise / binarising, the others "
        "to 0, e.g. 1:1,2:1,4:1 (BraTS whole tumour) or 1:1,4:1 (tumour core)",
    )
    full = train.add_argument_group(
        "full-resolution data (orientation, spacing and foreground crop apply to training, "
        "validation and, by default, unet3d predict)"
    )
    add_spatial_options(full)
    full.add_argument(
        "--patch-size",
        type=window_side,
        nargs="+",
        metavar="N",
        help="train on random patches N^3 (or D H W; multiples of 8, >= 16) of the cached "
        "volumes, drawn anew each epoch from --seed, and validate with sliding windows of "
        "that size (default: whole volumes)",
    )
    full.add_argument(
        "--pos-fraction",
        type=probability,
        metavar="P",
        help="with --patch-size: share of patches centred on a foreground voxel (default 0.5)",
    )
    full.add_argument(
        "--patches-per-volume",
        type=positive_int,
        metavar="N",
        help="with --patch-size: patches per training volume and epoch (default 1)",
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
        help="Dice weight (default 1; per voxel in the Bayesian strategies' summed ELBO, "
        "see unet3d.losses)",
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
    optim.add_argument(
        "--out-bias",
        action="store_true",
        help="give the output conv a bias (n_classes more parameters than the paper's "
        "U-Net; an exit from the all-background trap of small-data runs, see "
        "unet3d.losses); a bias-free source checkpoint loads with the bias at zero",
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


def check_train_args(args: argparse.Namespace) -> None:
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
    problems = (pattern_problem(args), augmentation_problem(args), spatial_problem(args))
    for problem in (*problems, trainable, _patch_problem(args)):
        if problem:
            error(problem)
    if args.binarise and args.n_classes not in (None, 2):
        error("--n-classes other than 2 needs --no-binarise")
    if not args.binarise and args.csv is not None and args.n_classes is None:
        if args.label_map is None:
            error("--csv with --no-binarise needs --n-classes or --label-map")
    top = max(args.label_map.values()) if args.label_map else 0
    if not args.binarise and args.n_classes is not None and top >= args.n_classes:
        error(f"--label-map maps to {top}, outside the --n-classes {args.n_classes} classes")


def _patch_problem(args: argparse.Namespace) -> str | None:
    """The usage error of the patch options, or ``None``."""
    if args.patch_size is None:
        tuning = {
            "--pos-fraction": args.pos_fraction,
            "--patches-per-volume": args.patches_per_volume,
        }
        return needs_problem(
            [flag for flag, value in tuning.items() if value is not None], "--patch-size"
        )
    if len(args.patch_size) not in (1, 3):
        return f"--patch-size takes 1 or 3 values, got {len(args.patch_size)}"
    if args.size is not None and len(args.size) in (1, 3):
        sizes, patch = (v * 3 if len(v) == 1 else v for v in (args.size, args.patch_size))
        if any(p > n for p, n in zip(patch, sizes, strict=True)):
            patch_text, size_text = (" ".join(map(str, v)) for v in (args.patch_size, args.size))
            return f"--patch-size {patch_text} exceeds --size {size_text}"
    return None

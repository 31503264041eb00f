"""Command line of the ``unet3d`` application: ``unet3d train`` and ``unet3d predict``.

Also runnable as ``python -m unet3d``.

``train``
    Trains a :class:`unet3d.UNet3D` with one of the :mod:`unet3d.strategies` on NIfTI data in
    the Medical Segmentation Decathlon layout (``--data``) or listed in a CSV (``--csv``),
    through :func:`unet3d.train.train`.  Validation data come from a second folder / table
    (``--val-data`` / ``--val-csv``) or a seeded share of the training cases
    (``--val-fraction``).  ``--out`` receives what :func:`~unet3d.train.train` writes
    (``metrics.csv``, ``metrics.json``, ``best.pt``, ``last.pt``) and ``config.json``: the
    command, the training config, the strategy and the cases used.  ``--resume`` continues an
    interrupted run with the same result as an uninterrupted one.
``predict``
    Rebuilds the network of a ``best.pt`` / ``last.pt`` (:func:`unet3d.inference.load_model`)
    and predicts NIfTI images (one file, a folder of them, or a Decathlon folder's test
    split) with sliding windows (:func:`unet3d.inference.predict_case`): for each image
    ``<id>_prob.nii.gz``, ``<id>_mask.nii.gz`` and ``<id>_mi.nii.gz`` (mutual information,
    averaged over ``--samples`` posterior samples of a Bayesian model), with the input's
    affine and header.

Errors in the input (:class:`unet3d.data.DataError`, :class:`unet3d.strategies.CheckpointError`,
:class:`dwp.priors.deep.PriorFileError`, other ``ValueError`` and ``OSError``) are printed as
one ``error: <message>`` line naming the file, with exit status 2; bad command-line arguments
get argparse's usage message (also status 2).  An interrupted ``train`` exits with status 130
and says how to resume.

Examples
--------
::

    unet3d train --data data/tumour --val-fraction 0.2 --strategy random_init --out runs/ri
    unet3d train --data data/tumour --val-fraction 0.2 --strategy dwp --prior prior.pt \\
        --beta 1e-3 --out runs/dwp
    unet3d predict --checkpoint runs/dwp/best.pt --input data/tumour --samples 8 --out pred/
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

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "build_parser", "main"]

#: Exit status of an input error (the same as argparse's for bad arguments).
EXIT_ERROR = 2
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

STRATEGY_NAMES = ("random_init", "pretrained", "pretrained_frozen", "normal_prior", "dwp")
#: ``--flag`` -> (argparse dest, field of the strategy dataclass it sets).  A flag given for
#: a strategy without that field is an argument error, not silently ignored.
STRATEGY_FLAGS: dict[str, tuple[str, str]] = {
    "--source": ("source", "source"),
    "--freeze-depth": ("freeze_depth", "freeze_depth"),
    "--trainable": ("trainable", "trainable"),
    "--prior": ("prior", "prior_path"),
    "--init": ("init", "init"),
    "--beta": ("beta", "beta"),
    "--beta-schedule": ("beta_schedule", "beta"),
    "--beta-start": ("beta_start", "beta"),
    "--beta-steps": ("beta_steps", "beta"),
    "--scale-lr": ("scale_lr", "scale_lr"),
    "--init-log-sigma": ("init_log_sigma", "init_log_sigma"),
    "--estimator": ("estimator", "estimator"),
    "--mode": ("mode", "mode"),
    "--ce-weight": ("ce_weight", "ce_weight"),
    "--dice-weight": ("dice_weight", "dice_weight"),
}
#: TrainConfig entries that may differ between a run and its ``--resume``.
RESUME_FREE = ("out_dir", "progress", "num_workers")
DEFAULT_ROI = 64
NIFTI_SUFFIXES = (".nii.gz", ".nii")


# ---------------------------------------------------------------------------------------------
# Argument parsing


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def _overlap(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _triple(values: Sequence[int] | None) -> int | tuple[int, int, int] | None:
    """``nargs="+"`` sizes: one int for a cube, or three."""
    if values is None:
        return None
    return values[0] if len(values) == 1 else (values[0], values[1], values[2])


def _add_train_parser(commands: Any) -> None:
    train = commands.add_parser(
        "train",
        help="train a U-Net with one of the strategies",
        description="Train unet3d.UNet3D on NIfTI data (unet3d.train.train).",
    )
    data = train.add_argument_group("data")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, metavar="DIR", help="Decathlon folder (training)")
    source.add_argument("--csv", type=Path, metavar="FILE", help="CSV of image / label paths")
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
        type=_fraction,
        metavar="F",
        help="validate on this share of the training cases (seeded by --seed)",
    )
    data.add_argument(
        "--val-split", metavar="NAME", help="with --val-csv: keep the rows of this split"
    )
    data.add_argument(
        "--size",
        type=_positive_int,
        nargs="+",
        metavar="N",
        help="crop / pad every volume to N^3 (or D H W), multiples of 8 (default: each "
        "volume padded to the next multiple of 8; cases must then share a shape)",
    )
    data.add_argument(
        "--modality", type=_non_negative_int, help="channel of 4D images to use (default: all)"
    )
    data.add_argument(
        "--no-binarise",
        dest="binarise",
        action="store_false",
        help="keep every label class (default: labels > 0 become 1, the whole tumour)",
    )
    data.add_argument(
        "--n-classes",
        type=_positive_int,
        help="output classes (default 2, or with --no-binarise the classes of dataset.json)",
    )
    data.add_argument(
        "--normalise",
        choices=("minmax", "zscore", "none"),
        default="minmax",
        help="intensity normalisation (default minmax, as the paper)",
    )

    strategy = train.add_argument_group("strategy (options apply to the strategies named)")
    strategy.add_argument("--strategy", choices=STRATEGY_NAMES, default="random_init")
    strategy.add_argument(
        "--source",
        type=Path,
        metavar="CKPT",
        help="source checkpoint (pretrained, pretrained_frozen; dwp: initial means)",
    )
    strategy.add_argument(
        "--freeze-depth",
        type=_non_negative_int,
        help="pretrained_frozen: blocks trained at each end (default 1)",
    )
    strategy.add_argument(
        "--trainable",
        nargs="+",
        metavar="BLOCK",
        help="pretrained_frozen: the blocks to train instead of --freeze-depth",
    )
    strategy.add_argument(
        "--prior", type=Path, metavar="FILE", help="dwp: DeepWeightPrior file (required)"
    )
    strategy.add_argument(
        "--init",
        choices=("pretrained", "prior", "fresh"),
        help="normal_prior, dwp: posterior means from the weights / prior samples / fresh",
    )
    strategy.add_argument(
        "--beta", type=float, help="normal_prior, dwp: KL weight (default 1; schedule end)"
    )
    strategy.add_argument(
        "--beta-schedule",
        choices=("constant", "linear", "cosine", "log_linear"),
        help="normal_prior, dwp: anneal the KL weight from --beta-start to --beta",
    )
    strategy.add_argument(
        "--beta-start", type=float, help="normal_prior, dwp: KL weight at step 0 (default 0)"
    )
    strategy.add_argument(
        "--beta-steps",
        type=_positive_int,
        help="normal_prior, dwp: length of the KL ramp in steps (default 1000)",
    )
    strategy.add_argument(
        "--scale-lr",
        type=_positive_float,
        help="normal_prior, dwp: learning rate of the posterior log-sigmas (default lr / 10)",
    )
    strategy.add_argument(
        "--init-log-sigma", type=float, help="normal_prior, dwp: initial log-sigma (default -5)"
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
    strategy.add_argument("--ce-weight", type=float, help="cross-entropy weight (default 0.01)")
    strategy.add_argument("--dice-weight", type=float, help="Dice weight (default 1)")

    optim = train.add_argument_group("training")
    optim.add_argument("--epochs", type=_positive_int, default=100, help="(default 100)")
    optim.add_argument("--lr", type=_positive_float, default=1e-3, help="(default 1e-3)")
    optim.add_argument("--batch-size", type=_positive_int, default=2, help="(default 2)")
    optim.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    optim.add_argument(
        "--lr-patience",
        type=_non_negative_int,
        default=10,
        help="ReduceLROnPlateau patience in validations (default 10)",
    )
    optim.add_argument(
        "--val-every",
        type=_positive_int,
        default=1,
        help="validate every N epochs and at the end of each cycle (default 1)",
    )
    optim.add_argument(
        "--min-lr",
        type=_positive_float,
        default=1e-6,
        help="learning-rate floor that ends a cycle (default 1e-6)",
    )
    optim.add_argument(
        "--restarts",
        type=_non_negative_int,
        default=0,
        help="cyclical restarts (source training for the prior; default 0)",
    )
    optim.add_argument("--seed", type=int, default=0, help="(default 0)")
    optim.add_argument(
        "--widths",
        type=_positive_int,
        nargs=4,
        default=[16, 32, 32, 64],
        metavar="W",
        help="U-Net channel widths (default 16 32 32 64, the paper's)",
    )

    out = train.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, metavar="DIR", help="run folder")
    out.add_argument("--resume", action="store_true", help="continue from DIR/last.pt")
    out.add_argument("--no-progress", dest="progress", action="store_false")
    train.set_defaults(handler=_train, check=_check_train_args, usage_error=train.error)


def _add_predict_parser(commands: Any) -> None:
    predict = commands.add_parser(
        "predict",
        help="predict NIfTI images with a trained model",
        description="Sliding-window prediction with a checkpoint of 'unet3d train' "
        "(unet3d.inference.predict_case): probability, mask and mutual-information maps.",
    )
    predict.add_argument(
        "--checkpoint", type=Path, required=True, metavar="CKPT", help="best.pt or last.pt"
    )
    predict.add_argument(
        "--input",
        type=Path,
        required=True,
        metavar="PATH",
        help="a NIfTI file, a folder of them, or a Decathlon folder (its test split)",
    )
    predict.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    predict.add_argument(
        "--samples",
        type=_positive_int,
        default=8,
        help="posterior samples of a Bayesian model (default 8; 1 pass if deterministic)",
    )
    predict.add_argument(
        "--roi",
        type=_positive_int,
        nargs="+",
        metavar="N",
        help=f"window N^3 (or D H W), multiples of 8, >= 16 (default: the training --size "
        f"when set, else {DEFAULT_ROI})",
    )
    predict.add_argument(
        "--overlap", type=_overlap, default=0.5, help="window overlap in [0, 1) (default 0.5)"
    )
    predict.add_argument(
        "--sw-batch-size", type=_positive_int, default=1, help="windows per forward (default 1)"
    )
    predict.add_argument(
        "--seed", type=int, default=0, help="seed of the posterior samples, per image (default 0)"
    )
    predict.add_argument("--device", default="cpu", help="torch device (default cpu)")
    predict.add_argument("--no-progress", dest="progress", action="store_false")
    predict.set_defaults(handler=_predict, check=_check_predict_args, usage_error=predict.error)


def build_parser() -> argparse.ArgumentParser:
    """The ``unet3d`` argument parser (subcommands ``train`` and ``predict``)."""
    parser = argparse.ArgumentParser(
        prog="unet3d",
        description="3D U-Net segmentation with transfer strategies and deep weight priors.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(commands)
    _add_predict_parser(commands)
    return parser


def _check_train_args(args: argparse.Namespace) -> None:
    """Argument errors argparse cannot see: options of other strategies, combinations."""
    from .strategies import STRATEGIES

    error = args.usage_error  # the subcommand's usage line and exit status 2
    fields = {f.name for f in dataclasses.fields(STRATEGIES[args.strategy]) if f.init}
    for flag, (dest, field) in STRATEGY_FLAGS.items():
        if getattr(args, dest) is not None and field not in fields:
            error(f"{flag} does not apply to --strategy {args.strategy}")
    if args.strategy in ("pretrained", "pretrained_frozen") and args.source is None:
        error(f"--strategy {args.strategy} needs --source CKPT")
    if args.strategy == "dwp" and args.prior is None:
        error("--strategy dwp needs --prior FILE")
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
    if args.binarise and args.n_classes not in (None, 2):
        error("--n-classes other than 2 needs --no-binarise")
    if not args.binarise and args.csv is not None and args.n_classes is None:
        error("--csv with --no-binarise needs --n-classes")


def _check_predict_args(args: argparse.Namespace) -> None:
    if args.roi is not None and len(args.roi) not in (1, 3):
        args.usage_error(f"--roi takes 1 or 3 values, got {len(args.roi)}")


# ---------------------------------------------------------------------------------------------
# train


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


def _split_cases(cases: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded ``(train, validation)`` split, each in the original order."""
    import numpy as np

    n_val = max(1, round(fraction * len(cases)))
    if n_val >= len(cases):
        raise ValueError(f"--val-fraction {fraction} leaves no training case out of {len(cases)}")
    chosen = set(np.random.default_rng(seed).permutation(len(cases))[:n_val].tolist())
    return (
        [c for i, c in enumerate(cases) if i not in chosen],
        [c for i, c in enumerate(cases) if i in chosen],
    )


def _check_source(path: Path, in_channels: int, n_classes: int, widths: Sequence[int]) -> None:
    """Fail before training, naming the file, when a source checkpoint does not fit."""
    from .model import UNet3D
    from .strategies import CheckpointError, load_state_dict

    state = load_state_dict(path)
    expected = UNet3D(in_channels, n_classes, widths).state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    wanted = {k: tuple(v.shape) for k, v in expected.items()}
    if shapes != wanted:
        wrong = sorted(k for k in wanted.keys() & shapes.keys() if wanted[k] != shapes[k])
        raise CheckpointError(
            f"{path}: weights do not fit UNet3D(in_channels={in_channels}, n_classes="
            f"{n_classes}, widths={tuple(widths)}) (missing {sorted(wanted.keys() - shapes.keys())[:3]}, "
            f"unexpected {sorted(shapes.keys() - wanted.keys())[:3]}, other shapes {wrong[:3]}); "
            "pass the source run's --widths"
        )


def _check_resume(out_dir: Path, config: dict[str, Any]) -> None:
    """A ``--resume`` must continue the same run: compare with ``last.pt``'s config."""
    from .strategies import CheckpointError, read_checkpoint

    last = out_dir / "last.pt"
    if not last.is_file():
        return  # nothing to resume: a fresh run
    payload = read_checkpoint(last)
    try:
        stored = json.loads(payload["config"])
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{last}: no readable training config ({error!r})") from error
    changed = sorted(
        k
        for k in config.keys() | stored.keys()
        if k not in RESUME_FREE and config.get(k) != stored.get(k)
    )
    if changed:
        diff = "; ".join(f"{k}: {stored.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise ValueError(
            f"{last}: --resume with other settings than the run it continues ({diff}); "
            "use a new --out folder instead"
        )


def _case_record(case: Any) -> dict[str, Any]:
    return {"id": case.id, "image": str(case.image), "label": str(case.label)}


def _train(args: argparse.Namespace) -> int:
    from .data import SegmentationDataset, decathlon_labels, load_csv, load_decathlon
    from .strategies import get_strategy
    from .train import TrainConfig, train

    for flag, path in (("--source", args.source), ("--prior", args.prior)):
        if path is not None and not path.is_file():  # before any data is read
            raise ValueError(f"{path}: file not found ({flag})")
    if args.data is not None:
        cases = load_decathlon(args.data, "train")
        declared = len(decathlon_labels(args.data))
    else:
        cases = load_csv(args.csv, split=args.split)
        declared = None
    if args.val_data is not None:
        val_cases = load_decathlon(args.val_data, "train")
    elif args.val_csv is not None:
        val_cases = load_csv(args.val_csv, split=args.val_split)
    elif args.val_fraction is not None:
        cases, val_cases = _split_cases(cases, args.val_fraction, args.seed)
    else:
        val_cases = None
    if args.binarise:
        n_classes = 2
    else:
        n_classes = args.n_classes if args.n_classes is not None else declared
    # labels are checked against the declared classes (before binarising), naming the file
    classes = declared if args.binarise else n_classes

    normalise = None if args.normalise == "none" else args.normalise
    size = _triple(args.size)

    def dataset(items: list) -> SegmentationDataset:
        return SegmentationDataset(
            items,
            normalise=normalise,
            modality=args.modality,
            binarise=args.binarise,
            classes=classes,
            size=size,
            cache=True,
        )

    train_set = dataset(cases)
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
        lr_patience=args.lr_patience,
        min_lr=args.min_lr,
        val_every=args.val_every,
        restarts=args.restarts,
        seed=args.seed,
        in_channels=in_channels,
        n_classes=n_classes,
        widths=tuple(args.widths),
        size=size,
        binarise=args.binarise,
        modality=args.modality,
        normalise=normalise,
        progress=args.progress,
    )
    strategy = get_strategy(args.strategy, **options)
    if args.source is not None:
        _check_source(args.source, in_channels, n_classes, config.widths)
    plain = json.loads(json.dumps(config.as_dict()))
    if args.resume:
        _check_resume(args.out, plain)

    from dwp._io import atomic_write

    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": shlex.join(["unet3d", *args.argv]),
        "config": plain,
        "strategy": json.loads(json.dumps(strategy.describe(), default=repr)),
        "train_cases": [_case_record(c) for c in cases],
        "val_cases": None if val_cases is None else [_case_record(c) for c in val_cases],
    }
    with atomic_write(args.out / "config.json") as f:
        f.write((json.dumps(record, indent=1) + "\n").encode())

    result = train(config, train_set, val_set, resume=args.resume, strategy=strategy)
    last = result.history[-1] if result.history else {}
    summary = f"{len(result.history)} epochs ({result.stop_reason})"
    if result.best_epoch >= 0:
        summary += f", best epoch {result.best_epoch}: val_loss {result.best_val_loss:.4g}"
    elif "train_loss" in last:
        summary += f", train_loss {last['train_loss']:.4g}"
    print(f"{summary}; wrote {args.out}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# predict


def _input_cases(path: Path) -> list:
    """Cases (unlabelled) of a NIfTI file, a folder of them or a Decathlon folder."""
    from .data import Case, DataError, load_decathlon

    def case(image: Path) -> Case:
        name = image.name
        stem = next((name[: -len(s)] for s in NIFTI_SUFFIXES if name.endswith(s)), name)
        return Case(stem, image.resolve())

    if path.is_file():
        if not path.name.endswith(NIFTI_SUFFIXES):
            raise DataError(f"{path}: not a NIfTI file (.nii or .nii.gz)")
        return [case(path)]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    if (path / "dataset.json").is_file():
        # Labels of the test split (labelsTs/) are not needed to predict: leave them out,
        # so that a bad label file cannot stop a prediction.
        return [dataclasses.replace(c, label=None) for c in load_decathlon(path, "test")]
    images = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
    if not images:
        raise DataError(f"{path}: no NIfTI files (.nii, .nii.gz) in this folder")
    return [case(p) for p in images]


def _roi(args: argparse.Namespace, config: dict[str, Any]) -> int | tuple[int, ...]:
    from .inference import MIN_ROI

    if args.roi is not None:
        return _triple(args.roi)  # type: ignore[return-value]
    # The network's instance norms saw windows of the training size: reuse it if it can be
    # a window.
    size = config.get("size")
    sizes = [size] * 3 if isinstance(size, int) else size
    if sizes and all(isinstance(s, int) and s >= MIN_ROI for s in sizes):
        return tuple(sizes)
    return DEFAULT_ROI


def _predict(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from .inference import load_model, predict_case

    trained = load_model(args.checkpoint)
    cases = _input_cases(args.input)
    roi = _roi(args, trained.config)
    model = trained.model.to(torch.device(args.device))
    samples = args.samples if trained.bayesian else 1
    kind = f"Bayesian, {samples} samples" if trained.bayesian else "deterministic"
    print(
        f"{trained.path}: {trained.strategy.get('name', '?')} U-Net ({kind}), "
        f"{len(cases)} image(s), window {roi}",
        file=sys.stderr,
    )
    for case in tqdm(cases, disable=not args.progress, desc="predict", unit="image"):
        written = predict_case(
            model,
            case,
            args.out,
            samples,
            normalise=trained.config.get("normalise", "minmax"),
            modality=trained.config.get("modality"),
            roi_size=roi,
            overlap=args.overlap,
            sw_batch_size=args.sw_batch_size,
            n_classes=trained.config.get("n_classes"),
            seed=args.seed,
        )
        tqdm.write(" ".join(str(p) for p in written.values()), file=sys.stdout)
    return 0


# ---------------------------------------------------------------------------------------------
# Entry point


def _message(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None:
        # "[Errno 2] No such file or directory: 'x'" -> "x: No such file or directory"
        return f"{error.filename}: {error.strerror or error}"
    return str(error) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``unet3d``; returns the exit status.

    Parameters
    ----------
    argv
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        0 on success, :data:`EXIT_ERROR` (2) for bad input (``error: ...`` on stderr),
        :data:`EXIT_INTERRUPTED` (130) after Ctrl-C.  Bad arguments raise ``SystemExit(2)``
        from argparse, as usual.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    args.check(args)
    try:
        return args.handler(args)
    except (ValueError, OSError) as error:
        # DataError, CheckpointError, PriorFileError and PriorMismatchError are ValueErrors
        # whose messages name the file or layer: the message is the whole story.
        print(f"error: {_message(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        hint = " (continue with --resume)" if args.command == "train" else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

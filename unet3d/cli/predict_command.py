"""``unet3d predict``: predict NIfTI images with a trained model.

Rebuilds the network of a ``best.pt`` / ``last.pt`` (:func:`unet3d.checkpoint.load_model`)
and predicts NIfTI images (one file, a folder searched with its subfolders, or a Decathlon
folder's test split: :func:`unet3d.cases.load_images`) with sliding windows
(:func:`unet3d.inference.predict_case`): for each image ``<id>_prob.nii.gz``,
``<id>_mask.nii.gz`` and ``<id>_mi.nii.gz`` (mutual information, averaged over
``--samples`` posterior samples of a Bayesian model), with the input's affine and header.

A folder is searched for every ``.nii`` / ``.nii.gz`` file at any depth, or for the files
of ``--pattern`` (:mod:`unet3d.patterns`), less those of ``--exclude`` (e.g. the labels,
``'*_seg.nii.gz'``) and the maps of an earlier prediction under ``--out``.  The maps of
``<input>/a/b/x.nii.gz`` go to ``<out>/a/b/``, so that images of one name in two
subfolders do not collide; those of a file or a Decathlon test split go to ``--out``.

Before any work the device, ``--out`` and every image's header are checked, so a missing
GPU, an unwritable folder or a mismatched image fails in seconds, not after the first
prediction.  ``--modality K`` (``--modalities 0,2``) keeps channels of 4D images, and
``--spacing``, ``--orientation``, ``--crop-foreground`` resample each image as in
training (default: the training run's choices, from the checkpoint); the maps are written
on the input's own grid and affine whatever the network's grid was
(:mod:`unet3d.spatial`).  The window is ``--roi``, else the training ``--patch-size``,
else its ``--size``.

``--progress`` / ``--no-progress``: tqdm bars on stderr over the images and over each
image's posterior samples (:func:`unet3d.inference.predict_volume`'s ``progress``); by
default only when stderr is a terminal, so that logs and pipes get none.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from nifti_io import NIFTI_SUFFIXES

from .arguments import (
    add_spatial_options,
    channels,
    check_output_folder,
    file_pattern,
    overlap,
    positive_int,
    spatial_of,
    spatial_problem,
    torch_device,
    triple,
    window_side,
)

__all__ = ["DEFAULT_ROI", "MAPS", "add_parser", "run"]

#: Window side when neither ``--roi`` nor the training ``--size`` gives one.
DEFAULT_ROI = 64
#: The maps :func:`unet3d.inference.predict_case` writes, ``<id>_<map>.nii.gz``.
MAPS = ("prob", "mask", "mi")
#: How the messages of :func:`unet3d.cases.load_images` name its pattern arguments.
_PATTERN_FLAGS = ("--pattern", "--exclude")


def add_parser(commands: Any) -> None:
    """Add ``unet3d predict`` to the subcommands ``commands``."""
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
        help="a NIfTI file; a folder, searched with its subfolders (the maps mirror them "
        "under --out); or a Decathlon folder (its test split)",
    )
    predict.add_argument(
        "--pattern",
        type=file_pattern,
        metavar="PATTERN",
        help="with a folder --input: predict the files matching PATTERN, relative to it "
        "(glob * ? [...], ** for any depth), e.g. '*.nii.gz' (the top folder only), "
        "'**/*_flair.nii.gz', '{id}/{id}_flair.nii.gz' ({id} names the maps; default: "
        "every .nii / .nii.gz file at any depth)",
    )
    predict.add_argument(
        "--exclude",
        type=file_pattern,
        action="append",
        metavar="PATTERN",
        help="with a folder --input: skip the files matching PATTERN (one without a / is a "
        "file name in any folder), e.g. '*_seg.nii.gz'; may be repeated",
    )
    predict.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    predict.add_argument(
        "--samples",
        type=positive_int,
        default=8,
        help="posterior samples of a Bayesian model (default 8; 1 pass if deterministic)",
    )
    predict.add_argument(
        "--roi",
        type=window_side,
        nargs="+",
        metavar="N",
        help=f"window N^3 (or D H W), multiples of 8, >= 16 (default: the training "
        f"--patch-size, else its --size when set, else {DEFAULT_ROI})",
    )
    predict.add_argument(
        "--overlap", type=overlap, default=0.5, help="window overlap in [0, 1) (default 0.5)"
    )
    predict.add_argument(
        "--sw-batch-size", type=positive_int, default=1, help="windows per forward (default 1)"
    )
    predict.add_argument(
        "--seed", type=int, default=0, help="seed of the posterior samples, per image (default 0)"
    )
    predict.add_argument(
        "--modality",
        "--modalities",
        dest="modality",
        type=channels,
        metavar="K[,K...]",
        help="channel(s) of 4D images to predict from, e.g. 1 or 0,2 (default: the training "
        "--modality, else all channels)",
    )
    add_spatial_options(predict, predict=True)
    predict.add_argument("--device", default="cpu", help="torch device (default cpu)")
    predict.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tqdm bars on stderr: over the images, and over each image's posterior "
        "samples (for one image and one pass, over its windows); default: when stderr is a "
        "terminal",
    )
    predict.set_defaults(handler=run, check=_check_args, usage_error=predict.error)


def _check_args(args: argparse.Namespace) -> None:
    if args.roi is not None and len(args.roi) not in (1, 3):
        args.usage_error(f"--roi takes 1 or 3 values, got {len(args.roi)}")
    problem = spatial_problem(args)
    if problem:
        args.usage_error(problem)


def _roi(args: argparse.Namespace, config: dict[str, Any]) -> int | tuple[int, ...]:
    from ..inference import MIN_ROI

    if args.roi is not None:
        return triple(args.roi)  # type: ignore[return-value]
    # The network's instance norms saw windows of the training size: reuse it if it can be
    # a window.
    size = config.get("patch_size") or config.get("size")
    sizes = [size] * 3 if isinstance(size, int) else size
    if sizes and all(isinstance(s, int) and s >= MIN_ROI for s in sizes):
        return tuple(sizes)
    return DEFAULT_ROI


def _searched_folder(args: argparse.Namespace) -> Path | None:
    """``--input`` resolved if it is a folder searched for images, else ``None`` (a file,
    or a Decathlon folder read from its ``dataset.json``, as :func:`load_images` does)."""
    source = args.input
    decathlon = (source / "dataset.json").is_file() and args.pattern is None and not args.exclude
    return source.resolve() if source.is_dir() and not decathlon else None


def _out_folders(args: argparse.Namespace, cases: list, searched: Path | None) -> list[Path]:
    """Per case, the folder of its maps: the image's subfolder of a ``searched`` folder
    mirrored under ``--out``; ``--out`` itself for a file or a Decathlon test split.

    Raises
    ------
    ValueError
        Two images whose maps would overwrite each other (``x.nii`` and ``x.nii.gz``
        side by side, or two Decathlon test entries of one name), naming both.
    """
    folders = [
        args.out if searched is None else args.out / c.image.parent.relative_to(searched)
        for c in cases
    ]
    seen: dict[Path, Path] = {}
    for case, folder in zip(cases, folders, strict=True):
        other = seen.setdefault(folder / case.id, case.image)
        if other != case.image:
            raise ValueError(
                f"{other} and {case.image} would both write {folder / case.id}_*.nii.gz; "
                "leave one out with --exclude"
            )
    return folders


def _not_maps(cases: list, out: Path) -> list:
    """``cases`` less the maps an earlier prediction wrote under ``out`` (which may lie in
    the folder searched, or be it): they are outputs, not images to predict."""
    out = out.resolve()
    names = tuple(f"_{key}{suffix}" for key in MAPS for suffix in NIFTI_SUFFIXES)
    return [c for c in cases if not (c.image.is_relative_to(out) and c.image.name.endswith(names))]


def run(args: argparse.Namespace) -> int:
    """Run ``unet3d predict`` with parsed arguments; returns the exit status (0)."""
    from tqdm.auto import tqdm

    from ..cases import DataError, load_images
    from ..checkpoint import load_model
    from ..inference import predict_case
    from ..preprocess import check_cases

    # Cheap checks first: a missing GPU or an unwritable --out must not surface after the
    # model is loaded and the first image predicted.
    device = torch_device(args.device)
    check_output_folder(args.out)
    trained = load_model(args.checkpoint)
    found = load_images(args.input, args.pattern, args.exclude or (), names=_PATTERN_FLAGS)
    searched = _searched_folder(args)
    cases = found if searched is None else _not_maps(found, args.out)
    if not cases:
        raise DataError(f"{args.input}: the only images found are maps under --out {args.out}")
    skipped = (
        f" ({len(found) - len(cases)} earlier maps skipped)" if len(cases) < len(found) else ""
    )
    folders = _out_folders(args, cases, searched)
    modality = trained.config.get("modality") if args.modality is None else args.modality
    normalise = trained.config.get("normalise", "minmax")
    spatial = spatial_of(args, trained.config)
    check_cases(cases, modality, normalise)  # every header: a bad file fails before image 1
    roi = _roi(args, trained.config)
    model = trained.model.to(device)
    samples = args.samples if trained.bayesian else 1
    kind = f"Bayesian, {samples} samples" if trained.bayesian else "deterministic"
    print(
        f"{trained.path}: {trained.strategy.get('name', '?')} U-Net ({kind}), "
        f"{len(cases)} image(s){skipped}, window {roi}",
        file=sys.stderr,
    )
    # Unset, bars only for a person watching: in a log file or a pipe they are noise.
    show = sys.stderr.isatty() if args.progress is None else args.progress
    # MONAI's window bar stays on screen when done: over several images the bar over the
    # images paces the run, and one finished window line per image would only clutter it.
    windows = None if len(cases) == 1 else False
    progress = tqdm(cases, disable=not show, desc="predict", unit="image")
    for case, folder in zip(progress, folders, strict=True):
        written = predict_case(
            model,
            case,
            folder,
            samples,
            normalise=normalise,
            modality=modality,
            spatial=spatial,
            roi_size=roi,
            overlap=args.overlap,
            sw_batch_size=args.sw_batch_size,
            n_classes=trained.config.get("n_classes"),
            seed=args.seed,
            progress=show,
            window_progress=windows,
        )
        tqdm.write(" ".join(str(p) for p in written.values()), file=sys.stdout)
    return 0

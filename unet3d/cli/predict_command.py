"""``unet3d predict``: predict NIfTI images with a trained model.

Rebuilds the network of a ``best.pt`` / ``last.pt`` (:func:`unet3d.checkpoint.load_model`)
and predicts NIfTI images (one file, a folder of them, or a Decathlon folder's test split:
:func:`unet3d.cases.load_images`) with sliding windows
(:func:`unet3d.inference.predict_case`): for each image ``<id>_prob.nii.gz``,
``<id>_mask.nii.gz`` and ``<id>_mi.nii.gz`` (mutual information, averaged over
``--samples`` posterior samples of a Bayesian model), with the input's affine and header.

Before any work the device, ``--out`` and every image's header are checked, so a missing
GPU, an unwritable folder or a mismatched image fails in seconds, not after the first
prediction.  ``--modality K`` keeps one channel of 4D images (default: the training one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .arguments import (
    check_output_folder,
    non_negative_int,
    overlap,
    positive_int,
    torch_device,
    triple,
)

__all__ = ["DEFAULT_ROI", "add_parser", "run"]

#: Window side when neither ``--roi`` nor the training ``--size`` gives one.
DEFAULT_ROI = 64


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
        help="a NIfTI file, a folder of them, or a Decathlon folder (its test split)",
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
        type=positive_int,
        nargs="+",
        metavar="N",
        help=f"window N^3 (or D H W), multiples of 8, >= 16 (default: the training --size "
        f"when set, else {DEFAULT_ROI})",
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
        type=non_negative_int,
        metavar="K",
        help="channel of 4D images to predict from (default: the training --modality, "
        "else all channels)",
    )
    predict.add_argument("--device", default="cpu", help="torch device (default cpu)")
    predict.add_argument("--no-progress", dest="progress", action="store_false")
    predict.set_defaults(handler=run, check=_check_args, usage_error=predict.error)


def _check_args(args: argparse.Namespace) -> None:
    if args.roi is not None and len(args.roi) not in (1, 3):
        args.usage_error(f"--roi takes 1 or 3 values, got {len(args.roi)}")


def _roi(args: argparse.Namespace, config: dict[str, Any]) -> int | tuple[int, ...]:
    from ..inference import MIN_ROI

    if args.roi is not None:
        return triple(args.roi)  # type: ignore[return-value]
    # The network's instance norms saw windows of the training size: reuse it if it can be
    # a window.
    size = config.get("size")
    sizes = [size] * 3 if isinstance(size, int) else size
    if sizes and all(isinstance(s, int) and s >= MIN_ROI for s in sizes):
        return tuple(sizes)
    return DEFAULT_ROI


def run(args: argparse.Namespace) -> int:
    """Run ``unet3d predict`` with parsed arguments; returns the exit status (0)."""
    from tqdm.auto import tqdm

    from ..cases import load_images
    from ..checkpoint import load_model
    from ..inference import predict_case
    from ..preprocess import check_cases

    # Cheap checks first: a missing GPU or an unwritable --out must not surface after the
    # model is loaded and the first image predicted.
    device = torch_device(args.device)
    check_output_folder(args.out)
    trained = load_model(args.checkpoint)
    cases = load_images(args.input)
    modality = trained.config.get("modality") if args.modality is None else args.modality
    normalise = trained.config.get("normalise", "minmax")
    check_cases(cases, modality, normalise)  # every header: a bad file fails before image 1
    roi = _roi(args, trained.config)
    model = trained.model.to(device)
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
            normalise=normalise,
            modality=modality,
            roi_size=roi,
            overlap=args.overlap,
            sw_batch_size=args.sw_batch_size,
            n_classes=trained.config.get("n_classes"),
            seed=args.seed,
        )
        tqdm.write(" ".join(str(p) for p in written.values()), file=sys.stdout)
    return 0

"""What :func:`unet3d.train.train` trains and validates on: the data loaders of a run
(:func:`load_data`, Case lists loaded as the config says) and the validation pass
(:func:`validate`, the paper's loss and Dice of the posterior-mean prediction).

With ``TrainConfig.patch_size`` the training items are random patches of the cached
volumes and validation predicts each whole volume with sliding windows of the patch size
(:class:`ValidationLoader` carries the window to :func:`validate`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import devices
from .config import TrainConfig
from .data import Case, SegmentationDataset, base_dataset, check_augmentation, collate
from .losses import paper_loss

__all__ = [
    "VALIDATION_OVERLAP",
    "TrainData",
    "ValidationLoader",
    "as_dataset",
    "load_data",
    "validate",
]

#: Overlap of the sliding windows of validation (MONAI's default; ``unet3d predict`` uses
#: 0.5): a cheaper pass, run every ``val_every`` epochs.
VALIDATION_OVERLAP = 0.25


class ValidationLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` of whole validation volumes that
    :func:`validate` predicts with sliding windows of ``roi_size`` (``None``: one forward
    pass per batch)."""

    def __init__(self, dataset: Dataset, roi_size: Sequence[int] | None, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.roi_size = None if roi_size is None else tuple(roi_size)


@dataclass
class TrainData:
    """The data loaders of a run; the training order of epoch ``e`` depends on
    ``(seed, e)`` only (:meth:`start_epoch`)."""

    train_set: Dataset
    sampler: DistributedSampler
    loader: DataLoader
    val_loader: DataLoader | None

    def start_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        loading = base_dataset(self.train_set)  # a Subset's too: a new augmentation draw
        if hasattr(loading, "set_epoch"):
            loading.set_epoch(epoch)


def as_dataset(
    data: Sequence[Case] | Dataset,
    config: TrainConfig,
    training: bool,
    classes: int | None = None,
) -> Dataset:
    """Case lists loaded as the config says (augmented and cut into patches only if
    ``training``; labels checked to lie in ``[0, classes)`` when given); a ready dataset as
    it is, once checked to augment alike."""
    augmentation = config.augmentation if training else None
    if isinstance(data, Dataset):
        check_augmentation(data, augmentation, "training" if training else "validation")
        return data
    cases = list(data)
    if cases and not all(isinstance(c, Case) for c in cases):
        raise TypeError("pass a Dataset or a sequence of unet3d.data.Case")
    patch = config.patch_size if training else None
    return SegmentationDataset(
        cases,
        normalise=config.normalise,
        modality=config.modality,
        binarise=config.binarise,
        classes=classes,
        size=config.size,
        augment=augmentation or False,
        seed=config.seed,
        cache=True,
        label_map=config.label_map,
        spatial=config.spatial,
        patch_size=patch,
        pos_fraction=config.pos_fraction,
        patches_per_volume=config.patches_per_volume if patch else 1,
    )


def load_data(
    config: TrainConfig,
    train_cases: Sequence[Case] | Dataset,
    val_cases: Sequence[Case] | Dataset | None,
    where: devices.Placement,
) -> TrainData:
    train_set = as_dataset(train_cases, config, training=True)
    val_set = None if val_cases is None else as_dataset(val_cases, config, training=False)
    world = where.world
    if config.batch_size * world > len(train_set):
        raise ValueError(
            f"global batch {config.batch_size * world} exceeds the {len(train_set)} "
            "training volumes"
        )
    # One replica without DDP: the order of epoch e depends on (seed, e) only, in both cases.
    sampler = DistributedSampler(
        train_set, num_replicas=world, rank=where.rank, shuffle=config.shuffle, seed=config.seed
    )
    pin = where.device.type == "cuda"  # page-locked batches copy to the GPU asynchronously
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=config.num_workers,
        pin_memory=pin,
    )
    # Whole volumes under sliding windows: one at a time (their shapes may differ).
    val_batch = config.batch_size if config.patch_size is None else 1
    val_loader = (
        None
        if val_set is None
        else ValidationLoader(
            val_set,
            config.patch_size,
            batch_size=val_batch,
            collate_fn=collate,
            pin_memory=pin,
        )
    )
    return TrainData(train_set, sampler, loader, val_loader)


def _logits(model: nn.Module, image: Tensor, roi_size: Sequence[int] | None) -> Tensor:
    """``(B, K, D, H, W)`` logits of whole volumes: one forward pass, or Gaussian-blended
    sliding windows of ``roi_size`` (MONAI)."""
    if roi_size is None:
        return model(image)
    from monai.inferers import sliding_window_inference

    logits = sliding_window_inference(
        image, tuple(roi_size), 1, model, overlap=VALIDATION_OVERLAP, mode="gaussian"
    )
    return logits.as_subclass(Tensor)


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    roi_size: Sequence[int] | None = None,
) -> dict[str, float]:
    """Paper loss (mean over batches, weighted by volumes) and mean foreground Dice of the
    posterior-mean prediction (eval mode), computed on ``device``, scored on the CPU.

    Whole volumes are predicted with sliding windows of ``roi_size``, by default the
    ``roi_size`` of a :class:`ValidationLoader` (the training patch size), else in one
    forward pass per batch."""
    from .metrics import evaluate  # imports MONAI metrics; only needed with validation

    loss_fn = paper_loss()
    roi_size = roi_size if roi_size is not None else getattr(loader, "roi_size", None)
    was_training = model.training
    model.eval()
    total, count, predictions, labels = 0.0, 0, [], []
    for batch in loader:
        image, label = devices.batch_to(batch, device)
        logits = _logits(model, image, roi_size)
        total += float(loss_fn(logits, label)) * logits.shape[0]
        count += logits.shape[0]
        predictions.extend(logits.argmax(1).cpu())  # the metrics are MONAI's / SciPy's, on CPU
        labels.extend(batch["label"])  # volumes one by one: their shapes may differ
    model.train(was_training)
    scores = evaluate(predictions, labels)
    return {"val_loss": total / count, "val_dice": float(scores["dice_mean"])}

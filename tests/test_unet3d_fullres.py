"""Full-resolution data (unet3d.spatial and its users): spacing, orientation and foreground
crop on load and their inverse on an oblique grid, patch training with foreground
oversampling, sliding-window validation, modality choice, label tables, the errors of bad
input, and ``unet3d predict`` writing on the input's own grid."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from decathlon import write_decathlon
from torch import nn

from unet3d import cli
from unet3d.config import Augmentation, TrainConfig, check_patch
from unet3d.data import Case, DataError, SegmentationDataset, collate
from unet3d.inference import MIN_ROI, predict_case
from unet3d.preprocess import check_cases
from unet3d.spatial import Spatial, apply_spatial, resample, voxel_spacing
from unet3d.train import train
from unet3d.train_data import ValidationLoader, validate

WIDTHS = (2, 4, 4, 8)
#: File voxel sizes (mm): anisotropic, as most clinical scans.
FILE_SPACING = (1.0, 1.2, 2.0)


def _rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    """Rotation about x, then y, then z (degrees)."""
    out = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(degrees)):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        step = np.eye(3)
        step[i, i], step[i, j], step[j, i], step[j, j] = c, -s, s, c
        out = step @ out
    return out


def oblique_affine() -> np.ndarray:
    """An oblique grid: voxel axes permuted and flipped against RAS (axis 0 points
    anterior, 1 left, 2 superior), rotated by (12, -9, 15) degrees, anisotropic voxels, an
    origin off 0; reorienting it to RAS permutes and flips axes, without interpolation."""
    permute = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = _rotation((12, -9, 15)) @ permute @ np.diag(FILE_SPACING)
    affine[:3, 3] = (-20.0, 7.5, 3.0)
    return affine


OBLIQUE = oblique_affine()


def _world(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    index = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1)
    return index @ affine[:3, :3].T + affine[:3, 3]


def _ball_case(root: Path, name: str, radius: float, shape=(26, 24, 14)) -> Case:
    """A skull-stripped-like scan on the oblique grid: a bright head (zero outside, a
    radius of ``radius + 4`` mm) holding a ball of ``radius`` mm labelled 1."""
    world = _world(shape, OBLIQUE)
    centre = _world(shape, OBLIQUE)[shape[0] // 2, shape[1] // 2, shape[2] // 2]
    distance = np.linalg.norm(world - centre, axis=-1)
    image = np.where(distance < radius + 4, 1.0 + np.cos(distance / 3), 0.0).astype(np.float32)
    label = (distance < radius).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, OBLIQUE), root / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label, OBLIQUE), root / f"{name}_seg.nii.gz")
    return Case(name, root / f"{name}.nii.gz", root / f"{name}_seg.nii.gz")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


# ---------------------------------------------------------------------------------------------
# The geometry and its inverse


def test_orientation_and_foreground_crop_round_trip_exactly_on_an_oblique_grid(tmp_path):
    case = _ball_case(tmp_path, "c", radius=6)
    file_label = np.asarray(nib.load(case.label).dataobj).astype(np.int64)
    # the reoriented grid's own spacing: a "resampling" that must change nothing
    reoriented = apply_spatial(Spatial(orientation="RAS"), np.zeros((1, 26, 24, 14)), OBLIQUE)
    assert nib.aff2axcodes(reoriented.affine) == ("R", "A", "S")
    same = voxel_spacing(reoriented.affine)
    assert sorted(same) == pytest.approx(sorted(FILE_SPACING)) and same != FILE_SPACING
    for spatial in (
        Spatial(orientation="RAS", crop_foreground=True),
        Spatial(orientation="RAS", crop_foreground=True, spacing=same),
    ):
        item = SegmentationDataset([case], spatial=spatial)[0]
        record = item["spatial"]
        # cropped to the head and padded to multiples of 8: another grid than the file's
        assert item["image"].shape[1:] == record.shape != record.file_shape
        assert item["original_shape"] == record.file_shape == (26, 24, 14)
        assert np.array_equal(item["affine"], record.file_affine)
        back = record.to_file_grid(item["label"])
        assert back.dtype == np.int64 and np.array_equal(back, file_label)
        # the network's grid maps its voxels to the file's millimetres: the label's centre
        # of mass is the same point in both
        net_world = _world(record.shape, record.affine)[item["label"].numpy() == 1].mean(0)
        file_world = _world(record.file_shape, OBLIQUE)[file_label == 1].mean(0)
        assert net_world == pytest.approx(file_world, abs=1e-6)


def test_a_spacing_change_round_trips_within_the_nearest_neighbour_bound(tmp_path):
    """Nearest-neighbour resampling to spacing h1 and back to h0 moves the boundary of a
    ball of radius r by |d| <= h/2 per resampling along its normal, uniform over the voxel
    phases: E|d| <= (h0 + h1) / 4 with h the largest voxel side.  The symmetric difference
    is the surface times E|d|, so Dice = 1 - |A xor B| / (|A| + |B|) >= 1 - 3 E|d| / (2 r)
    (4 pi r^2 E|d| over 2 * 4/3 pi r^3)."""
    radius, h1 = 8.0, 1.5
    case = _ball_case(tmp_path, "c", radius=radius, shape=(30, 28, 16))
    file_label = np.asarray(nib.load(case.label).dataobj).astype(np.int64)
    spatial = Spatial(orientation="RAS", crop_foreground=True, spacing=h1)
    item = SegmentationDataset([case], spatial=spatial)[0]
    assert voxel_spacing(item["spatial"].affine) == pytest.approx((h1,) * 3)
    back = item["spatial"].to_file_grid(item["label"])
    bound = 1 - 3 * (max(FILE_SPACING) + h1) / 4 / (2 * radius)
    dice = _dice(back == 1, file_label == 1)
    assert bound == pytest.approx(0.836, abs=1e-3)
    assert dice > bound, dice  # measured 0.955
    assert not np.array_equal(back, file_label)  # a real resampling, not the identity


def test_resample_keeps_integer_maps_and_probabilities(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[1:3, 1:3, 1:3] = 3
    fine = np.diag([1.0, 1.0, 1.0, 1.0])
    fine[:3, 3] = -0.5  # the 2 mm voxels' corners: each splits into 8 voxels of 1 mm
    up = resample(labels, affine, fine, (8, 8, 8), "nearest")
    assert up.dtype == np.uint8 and np.array_equal(
        up, labels.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    )
    probabilities = np.stack([1 - labels / 3, labels / 3]).astype(np.float32)
    smooth = resample(probabilities, affine, fine, (8, 8, 8), "bilinear")
    assert smooth.dtype == np.float32 and smooth.shape == (2, 8, 8, 8)
    inside = np.zeros((8, 8, 8), bool)
    inside[1:-1, 1:-1, 1:-1] = True  # zeros come in from outside the grid at its faces
    assert smooth.sum(0)[inside] == pytest.approx(1, abs=1e-6)


def test_foreground_crop_is_the_box_of_any_channel_above_its_minimum(tmp_path):
    affine = np.diag([1.0, 1.5, 2.0, 1.0])
    affine[:3, 3] = (10, 20, 30)
    image = np.full((2, 16, 16, 12), -3.0, np.float32)  # a background below 0
    image[0, 3:9, 4:7, 2:5] = 1
    image[1, 5:12, 6:10, 3:4] = 2
    out = apply_spatial(Spatial(crop_foreground=True), image, affine)
    assert out.image.shape == (2, 12 - 3, 10 - 4, 5 - 2)
    assert np.array_equal(out.affine[:3, 3], affine[:3, :3] @ (3, 4, 2) + affine[:3, 3])
    assert np.array_equal(out.image, image[:, 3:12, 4:10, 2:5])
    with pytest.raises(DataError, match=r"flat\.nii\.gz: no foreground.*--crop-foreground"):
        apply_spatial(Spatial(crop_foreground=True), image[:, :1] * 0, affine, path="flat.nii.gz")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spacing": (1, 0, 1)}, "spacing must be one or 3 finite numbers > 0"),
        ({"spacing": (1, 2)}, "spacing must be one or 3"),
        ({"orientation": "RAR"}, "orientation must be 3 axis codes"),
        ({"orientation": "RA"}, "orientation must be 3 axis codes"),
    ],
)
def test_bad_spatial_options_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Spatial(**kwargs)
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)
    assert Spatial(spacing=2, orientation="las").spacing == (2.0, 2.0, 2.0)
    assert Spatial(orientation="las").orientation == "LAS"


# ---------------------------------------------------------------------------------------------
# Defaults unchanged


def test_defaults_give_the_arrays_of_a_centred_pad(tmp_path):
    """No new option: the file's voxel order, min-max, a centred pad to multiples of 8
    (offsets (2, 3, 0) for 20 x 18 x 16 -> 24 x 24 x 16), as before this module."""
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(20, 18, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(raw, OBLIQUE), tmp_path / "x.nii.gz")
    nib.save(nib.Nifti1Image((raw > 0.5).astype(np.uint8), OBLIQUE), tmp_path / "y.nii.gz")
    case = Case("x", tmp_path / "x.nii.gz", tmp_path / "y.nii.gz")
    item = SegmentationDataset([case])[0]
    expected = np.zeros((1, 24, 24, 16), np.float32)
    expected[0, 2:22, 3:21] = (raw - raw.min()) / (raw.max() - raw.min())
    assert torch.equal(item["image"], torch.from_numpy(expected))
    assert item["spatial"] is None and item["crop"].offset == (2, 3, 0)
    assert item["label"].sum() == int((raw > 0.5).sum())
    explicit = SegmentationDataset([case], spatial=Spatial(), modality=0)[0]
    assert torch.equal(explicit["image"], item["image"]) and explicit["spatial"] is None


def test_config_defaults_keep_todays_run_and_old_runs_resume():
    defaults = TrainConfig().as_dict()
    new = {
        "label_map": None, "spacing": None, "orientation": None, "crop_foreground": False,
        "patch_size": None, "pos_fraction": 0.5, "patches_per_volume": 1,
    }  # fmt: skip
    assert {k: defaults[k] for k in new} == new
    old = {k: v for k, v in defaults.items() if k not in new}
    assert TrainConfig(**old).as_dict() == defaults  # a run lacking them had the defaults
    full = TrainConfig(
        modality=[0, 2], label_map={1: 1, 2: 1, 4: 1}, spacing=1.5, orientation="ras",
        crop_foreground=True, patch_size=16, pos_fraction=0.3, patches_per_volume=2,
    )  # fmt: skip
    stored = json.loads(json.dumps(full.as_dict()))
    assert stored["label_map"] == {"1": 1, "2": 1, "4": 1} and stored["modality"] == [0, 2]
    again = TrainConfig(**stored)
    assert again.as_dict() == full.as_dict() and again.label_map == {1: 1, 2: 1, 4: 1}
    assert (again.spacing, again.orientation, again.patch_size) == (
        (1.5, 1.5, 1.5), "RAS", (16, 16, 16),
    )  # fmt: skip
    assert TrainConfig(modality=[3]).modality == 3  # one channel: the int of older runs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patch_size": 12}, "patch_size must be an int or 3 ints, each a multiple of 8"),
        ({"patch_size": 8}, "at least 16"),
        ({"patches_per_volume": 2}, "patches_per_volume needs patch_size"),
        ({"patch_size": 16, "pos_fraction": 1.5}, r"pos_fraction must be in \[0, 1\]"),
        ({"patch_size": 32, "size": 16}, "patch_size .* exceeds the volumes' size 16"),
        ({"label_map": {1: -1}}, "label_map must map label values"),
        ({"label_map": {1: 3}, "binarise": False}, r"label_map maps to 3, outside the 2"),
        ({"modality": [1, 1]}, "modality must be a non-negative int, a sequence of distinct"),
    ],
)
def test_bad_config_options_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_patch_sides_are_the_windows_inference_takes():
    assert check_patch(MIN_ROI) == (MIN_ROI,) * 3
    with pytest.raises(ValueError):
        check_patch(MIN_ROI - 8)


# ---------------------------------------------------------------------------------------------
# Modalities, label tables, mismatched grids


def _four_channel_case(tmp_path: Path) -> Case:
    image = np.stack([np.full((8, 8, 8), 10.0 * (c + 1)) for c in range(4)], -1)
    image[0, 0, 0] = 0  # each channel min-maxes to a known pattern
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[1, :, :], labels[2, :, :], labels[3, :, :], labels[4, :, :] = 1, 2, 3, 4
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), tmp_path / "b.nii.gz")
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "b_seg.nii.gz")
    return Case("b", tmp_path / "b.nii.gz", tmp_path / "b_seg.nii.gz")


def test_modalities_are_kept_in_the_order_given(tmp_path):
    case = _four_channel_case(tmp_path)
    raw = np.moveaxis(np.asarray(nib.load(case.image).dataobj), -1, 0)
    picked = SegmentationDataset([case], normalise=None, modality=(3, 1))[0]["image"]
    assert torch.equal(picked, torch.from_numpy(raw[[3, 1]]).float())
    one = SegmentationDataset([case], normalise=None, modality=2)[0]["image"]
    assert torch.equal(one, SegmentationDataset([case], normalise=None, modality=[2])[0]["image"])
    assert check_cases([case], (3, 1)) == 2 and check_cases([case], 2) == 1
    for check in (
        lambda: SegmentationDataset([case], modality=(0, 4))[0],
        lambda: check_cases([case], (0, 4)),
    ):
        with pytest.raises(DataError, match=r"b\.nii\.gz: modality 4 out of range \(--modality"):
            check()


def test_label_map_applies_after_the_class_check(tmp_path):
    case = _four_channel_case(tmp_path)
    raw = np.asarray(nib.load(case.label).dataobj)
    whole = {1: 1, 2: 1, 4: 1}  # BraTS whole tumour: 3 (not in BraTS) -> 0
    label = SegmentationDataset([case], label_map=whole, classes=5)[0]["label"].numpy()
    assert np.array_equal(label, np.isin(raw, (1, 2, 4)).astype(np.int64))
    core = SegmentationDataset([case], label_map={1: 2, 4: 1})[0]["label"].numpy()
    assert np.array_equal(core, np.select([raw == 1, raw == 4], [2, 1], 0))
    with pytest.raises(DataError, match=r"labels \[4\] outside the declared classes"):
        SegmentationDataset([case], label_map=whole, classes=4)[0]  # the files' classes


def test_mismatched_spacing_names_both_files_and_both_spacings(tmp_path):
    image = np.ones((8, 8, 8), np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "i.nii.gz")
    # another spacing, and so another shape: the spacing is named, the likely cause
    coarse = np.diag([1.0, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.uint8), coarse), tmp_path / "l.nii.gz")
    case = Case("i", tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")
    message = (
        r"l\.nii\.gz: label voxel spacing \(1, 1, 2\) mm differs from the image's \(1, 1, 1\) "
        r"mm \(.*i\.nii\.gz\)"
    )
    for check in (lambda: check_cases([case]), lambda: SegmentationDataset([case])[0]):
        with pytest.raises(DataError, match=message) as caught:
            check()
        assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Patches


def _dot_case(tmp_path: Path) -> Case:
    """48^3, foreground a 2^3 cube in the middle: a patch of 16 centred on a background
    voxel can never be moved (by MONAI's border shift) onto it, so the patch's central
    voxel is foreground exactly when the draw was positive."""
    image = np.random.default_rng(0).random((48, 48, 48)).astype(np.float32)
    label = np.zeros((48, 48, 48), np.uint8)
    label[23:25, 23:25, 23:25] = 1
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "d.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "d_seg.nii.gz")
    return Case("d", tmp_path / "d.nii.gz", tmp_path / "d_seg.nii.gz")


def _centres(dataset: SegmentationDataset, epochs: int) -> list[int]:
    out = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        out += [int(dataset[i]["label"][8, 8, 8]) for i in range(len(dataset))]
    return out


@pytest.mark.parametrize("pos_fraction", [0.25, 0.0, 1.0])
def test_positive_patches_come_at_the_asked_rate(tmp_path, pos_fraction):
    """300 draws: the count of positive centres is Binomial(300, p); within 4 sd."""
    dataset = SegmentationDataset(
        [_dot_case(tmp_path)], patch_size=16, pos_fraction=pos_fraction,
        patches_per_volume=30, cache=True,
    )  # fmt: skip
    assert len(dataset) == 30
    item = dataset[0]
    assert item["image"].shape == (1, 16, 16, 16) and item["label"].shape == (16, 16, 16)
    cached = dataset._cache[0]["image"]  # the cache holds the whole volume
    assert cached.shape == (1, 48, 48, 48)
    before = cached.copy()
    item["image"].fill_(7.0)  # a patch is a copy: the caller cannot change the cache
    assert np.array_equal(dataset._cache[0]["image"], before)
    n, positives = 300, sum(_centres(dataset, 10))
    sd = np.sqrt(n * pos_fraction * (1 - pos_fraction))
    assert abs(positives - n * pos_fraction) <= 4 * sd, positives  # 0.25: measured 0.22 (67 of 300)


def test_patches_depend_only_on_seed_epoch_and_index(tmp_path):
    case = _dot_case(tmp_path)

    def make(seed=0):
        return SegmentationDataset([case], patch_size=16, patches_per_volume=4, seed=seed)

    first, second = make(), make()
    second.set_epoch(3)
    for index in (3, 1):  # another order, another epoch first: the same draws
        second[index]
    second.set_epoch(0)
    draws = [first[i]["image"] for i in range(4)]
    assert all(torch.equal(second[i]["image"], draws[i]) for i in (2, 0, 3, 1))
    assert not torch.equal(draws[0], draws[1])  # items of one volume are other patches
    first.set_epoch(1)
    assert not all(torch.equal(first[i]["image"], draws[i]) for i in range(4))
    assert not torch.equal(make(seed=1)[0]["image"], draws[0])
    # the patches have a stream of their own: an augmentation that changes nothing leaves
    # them as they were
    still = Augmentation(flip_prob=0, rotate_prob=0, intensity_prob=0)
    augmented = SegmentationDataset([case], patch_size=16, patches_per_volume=4, augment=still)
    assert all(torch.equal(augmented[i]["image"], draws[i]) for i in range(4))


# ---------------------------------------------------------------------------------------------
# Validation and training


class _Recorder(nn.Module):
    """A 1x1x1 conv that records the spatial sizes it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape[2:]))
        return self.conv(x)


def test_validation_slides_windows_of_the_patch_size(tmp_path):
    cases = [_ball_case(tmp_path, f"v{i}", radius=5 + i) for i in range(2)]
    data = SegmentationDataset(cases, spatial=Spatial(orientation="RAS", crop_foreground=True))
    shapes = {tuple(data[i]["image"].shape[1:]) for i in range(2)}
    torch.manual_seed(0)
    model = _Recorder()
    windowed = validate(model, ValidationLoader(data, (16, 16, 16), collate_fn=collate), "cpu")
    assert set(model.seen) == {(16, 16, 16)} and len(model.seen) > 2
    model.seen.clear()
    whole = validate(model, ValidationLoader(data, None, collate_fn=collate), "cpu")
    assert set(model.seen) == shapes
    # a pointwise model: blended windows give the whole-volume pass
    assert windowed == pytest.approx(whole, rel=1e-5)


def test_one_epoch_on_patches_with_windowed_validation(tmp_path):
    cases = [_ball_case(tmp_path, f"t{i}", radius=5 + i) for i in range(3)]
    config = TrainConfig(
        epochs=1, batch_size=2, lr=1e-2, widths=WIDTHS, progress=False, size=None,
        orientation="RAS", crop_foreground=True, spacing=1.5, patch_size=16,
        patches_per_volume=2, pos_fraction=0.5,
    )  # fmt: skip
    result = train(config, cases[:2], cases[2:])
    (record,) = result.history
    assert np.isfinite(record["train_loss"]) and 0 <= record["val_dice"] <= 1


# ---------------------------------------------------------------------------------------------
# Prediction on the input's grid


class _Bright(nn.Module):
    """Foreground (logit +5) wherever the first channel is above 0, else background (-5)."""

    in_channels = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        foreground = 10 * (x[:, :1] > 0).float() - 5
        return torch.cat([torch.zeros_like(foreground), foreground], 1)


def test_predict_case_maps_back_onto_the_oblique_grid(tmp_path):
    case = _ball_case(tmp_path / "in", "p", radius=6)
    source = nib.load(case.image)
    head = np.asarray(source.dataobj) > 0
    spatial = Spatial(orientation="RAS", crop_foreground=True)
    paths = predict_case(_Bright(), case, tmp_path / "out", spatial=spatial, roi_size=16)
    maps = {key: nib.load(path) for key, path in paths.items()}
    for image in maps.values():
        assert image.shape == source.shape
        assert np.allclose(image.affine, source.affine, atol=1e-6)
    mask = np.asarray(maps["mask"].dataobj)
    assert np.array_equal(mask == 1, head)  # exact: reorientation and crop only
    prob = np.asarray(maps["prob"].dataobj)
    assert prob[head] == pytest.approx(1 / (1 + np.exp(-5)), abs=1e-5)
    # outside the head: in the crop box, the network said background; outside it, nothing
    # was predicted and the map says background (0), never foreground
    assert prob[~head].max() <= 1 / (1 + np.exp(5)) + 1e-5
    spaced = Spatial(orientation="RAS", crop_foreground=True, spacing=1.5)
    paths = predict_case(_Bright(), case, tmp_path / "spaced", spatial=spaced, roi_size=16)
    resampled = np.asarray(nib.load(paths["mask"]).dataobj) == 1
    prob = np.asarray(nib.load(paths["prob"]).dataobj)
    assert np.array_equal(resampled, prob > 0.5)  # the mask is the probabilities' argmax
    # The head's boundary moves outward by up to a file voxel (h0 = 2 mm) on the way in (a
    # trilinear value is > 0 if any of its 8 neighbours is), h0 / 2 on average, then by
    # h1 / 4 on average on the way back (probabilities interpolated, cut at 0.5): the
    # bound of test_a_spacing_change_round_trips... with E|d| <= h0 / 2 + h1 / 4, r = 10.
    bound = 1 - 3 * (max(FILE_SPACING) / 2 + 1.5 / 4) / (2 * 10)
    assert _dice(resampled, head) > bound  # 0.79; measured 0.88


def _run(argv: list[str], capsys) -> tuple[int, str]:
    status = cli.main(argv)
    return status, capsys.readouterr().err


@pytest.fixture(scope="module")
def oblique_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("oblique") / "data"
    return write_decathlon(root, 3, affine=OBLIQUE, test_shape=(20, 18, 16))


def _train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--val-fraction", "0.34", "--widths", *map(str, WIDTHS),
        "--epochs", "1", "--batch-size", "2", "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


FULL = ("--orientation", "RAS", "--crop-foreground", "--spacing", "1.5", "--patch-size", "16")


def test_cli_trains_on_patches_and_predicts_on_the_input_grid(tmp_path, oblique_data, capsys):
    argv = _train_argv(oblique_data, tmp_path / "run", *FULL, "--patches-per-volume", "2")
    status, err = _run(argv, capsys)
    assert status == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["spacing"] == [1.5] * 3 and config["orientation"] == "RAS"
    assert config["crop_foreground"] is True and config["patch_size"] == [16] * 3
    assert config["patches_per_volume"] == 2 and config["pos_fraction"] == 0.5
    # --resume: the same run; another spacing is another run
    status, err = _run([*argv, "--resume"], capsys)
    assert status == 0, err
    status, err = _run(
        [*_train_argv(oblique_data, tmp_path / "run", *FULL[:-2]), "--resume"], capsys
    )
    assert status == cli.EXIT_ERROR and "patch_size: [16, 16, 16] -> None" in err

    test_image = oblique_data / "imagesTs" / "test0.nii.gz"
    out = tmp_path / "pred"
    predict = ["predict", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--input"]
    status, err = _run([*predict, str(test_image), "--out", str(out), "--no-progress"], capsys)
    assert status == 0, err
    assert "window (16, 16, 16)" in err  # the training patch, by default
    source = nib.load(test_image)
    for key in ("prob", "mask", "mi"):
        image = nib.load(out / f"test0_{key}.nii.gz")
        assert image.shape == source.shape == (20, 18, 16)
        assert np.allclose(image.affine, source.affine, atol=1e-6)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--label-map", "1-1"], "argument --label-map: must be FROM:TO pairs"),
        (["--label-map", "1:1,1:2"], "each FROM once"),
        (["--modalities", "0,0"], "argument --modality/--modalities: must be a channel index"),
        (["--orientation", "RAX"], "argument --orientation: must be 3 axis codes"),
        (["--spacing", "1", "2"], "--spacing takes 1 or 3 values, got 2"),
        (["--spacing", "0"], "argument --spacing: must be a positive number, got 0"),
        (["--pos-fraction", "0.3"], "--pos-fraction needs --patch-size"),
        (["--patches-per-volume", "2", "--pos-fraction", "1"], "need --patch-size"),
        (["--patch-size", "12"], "argument --patch-size: must be a multiple of 8, at least 16"),
        (["--patch-size", "32", "--size", "16"], "--patch-size 32 exceeds --size 16"),
        (
            ["--no-binarise", "--n-classes", "2", "--label-map", "4:2"],
            "--label-map maps to 2, outside the --n-classes 2 classes",
        ),
    ],
)
def test_bad_full_resolution_options_are_one_line_usage_errors(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--data", "d", "--out", "o", *extra])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "usage: unet3d train" in err
    assert err.strip().splitlines()[-1].startswith("unet3d train: error: ")
    assert message in err.strip().splitlines()[-1]


def test_bad_data_is_one_line_and_writes_nothing(tmp_path, oblique_data, capsys):
    out = tmp_path / "run"
    status, err = _run(_train_argv(oblique_data, out, "--modalities", "0,1"), capsys)
    assert status == cli.EXIT_ERROR and len(err.strip().splitlines()) == 1
    assert "case0.nii.gz: modality 1 out of range (--modality / --modalities" in err
    assert not out.exists()
    bad = tmp_path / "bad"
    write_decathlon(bad, 3, affine=OBLIQUE)
    label = nib.load(bad / "labelsTr" / "case1.nii.gz")
    coarse = label.affine @ np.diag([1.0, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), coarse), bad / "labelsTr" / "case1.nii.gz")
    status, err = _run(_train_argv(bad, out, *FULL), capsys)
    assert status == cli.EXIT_ERROR and len(err.strip().splitlines()) == 1
    assert "labelsTr/case1.nii.gz: label voxel spacing (1, 1.2, 4) mm differs" in err
    assert "imagesTr/case1.nii.gz" in err and not out.exists()


def test_a_run_from_before_these_options_resumes(tmp_path, oblique_data, capsys):
    argv = _train_argv(oblique_data, tmp_path / "run")
    assert cli.main(argv) == 0
    last = tmp_path / "run" / "last.pt"
    state = torch.load(last, weights_only=True)
    config = json.loads(state["config"])
    for key in (
        "label_map", "spacing", "orientation", "crop_foreground", "patch_size",
        "pos_fraction", "patches_per_volume",
    ):  # fmt: skip
        del config[key]
    torch.save({**state, "config": json.dumps(config)}, last)
    status, err = _run([*argv, "--epochs", "2", "--resume"], capsys)
    assert status == cli.EXIT_ERROR and "epochs: 1 -> 2" in err  # only the real change named
    assert "patch_size" not in err and "spacing" not in err and "label_map" not in err
    status, err = _run([*argv, "--resume"], capsys)
    assert status == 0, err

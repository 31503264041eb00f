"""unet3d.data: case lists, preprocessing, augmentation, bad-input errors, NIfTI writing."""

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import cohorts
from unet3d.data import (
    Augmentation,
    Case,
    DataError,
    SegmentationDataset,
    collate,
    decathlon_labels,
    load_csv,
    load_decathlon,
    save_nifti,
    uncrop,
)

SHAPE = (50, 59, 48)  # the cohorts' 4 mm grid
PADDED = (56, 64, 48)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "tumour"
    cohorts.generate("tumour_target", root, n_train=3, n_test=2, resolution=4, progress=False)
    return root


@pytest.fixture(scope="module")
def train(cohort):
    return load_decathlon(cohort, "train")


def _raw(path):
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


def _write(path, array, affine):
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


# --- case lists -------------------------------------------------------------------------------


def test_decathlon_lists_both_splits(cohort, train):
    assert [c.id for c in train] == [f"tumour_target_tr{i:04d}" for i in range(3)]
    assert all(c.image.is_file() and c.label.is_file() for c in train)
    test = load_decathlon(cohort / "dataset.json", "test")  # the json's path works too
    assert [c.id for c in test] == [f"tumour_target_ts{i:04d}" for i in range(2)]
    # Test labels come from labelsTs/ beside imagesTs/.
    assert [c.label.name for c in test] == [c.image.name for c in test]
    assert all(c.label.parent.name == "labelsTs" for c in test)
    assert decathlon_labels(cohort) == {0: "background", 1: "core", 2: "enhancing rim", 3: "oedema"}


def test_decathlon_test_without_labels_and_dict_entries(cohort, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(cohort, root, ignore=shutil.ignore_patterns("labelsTs"))
    index = json.loads((root / "dataset.json").read_text())
    index["test"] = [index["test"][0], {"image": index["test"][1]}]
    (root / "dataset.json").write_text(json.dumps(index))
    test = load_decathlon(root, "test")
    assert len(test) == 2 and all(c.label is None for c in test)
    item = SegmentationDataset(test)[0]
    assert item["label"] is None and item["image"].shape == (1, *PADDED)
    batch = collate([item, SegmentationDataset(test)[1]])
    assert batch["label"] is None and batch["image"].shape == (2, 1, *PADDED)


def test_csv_gives_the_same_cases(cohort, train, tmp_path):
    table = cohort.parent / "cases.csv"  # paths relative to the table's folder
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "split"])
        for c in train:
            writer.writerow(
                [c.image.relative_to(cohort.parent), c.label.relative_to(cohort.parent), "train"]
            )
        writer.writerow(["tumour/imagesTs/tumour_target_ts0000.nii.gz", "", "test"])
    assert load_csv(table, split="train") == train
    everything = load_csv(table)
    assert len(everything) == 4 and everything[-1].label is None
    assert all(c.label is None for c in load_csv(table, label_col=None))


# --- preprocessing ----------------------------------------------------------------------------


def test_pad_to_multiple_of_8_and_uncrop_restores(train):
    data = SegmentationDataset(train, classes=4)
    item = data[0]
    assert item["image"].shape == (1, *PADDED) and item["label"].shape == PADDED
    assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.int64
    assert all(n % 8 == 0 for n in item["image"].shape[1:])
    assert item["original_shape"] == SHAPE and item["id"] == train[0].id
    raw_image, affine = _raw(train[0].image)
    raw_label, _ = _raw(train[0].label)
    np.testing.assert_array_equal(item["affine"], affine)
    np.testing.assert_array_equal(uncrop(item["label"], item["crop"]).numpy(), raw_label)
    scaled = (raw_image - raw_image.min()) / (raw_image.max() - raw_image.min())
    np.testing.assert_allclose(uncrop(item["image"][0].numpy(), item["crop"]), scaled, atol=1e-6)


def test_crop_to_given_size_and_uncrop(train):
    # Axis 0 padded, axes 1 and 2 cropped (one of them by an odd number of voxels).
    item = SegmentationDataset(train, classes=4, size=(64, 56, 40))[1]
    assert item["image"].shape == (1, 64, 56, 40)
    back = uncrop(item["label"], item["crop"])
    raw_label, _ = _raw(train[1].label)
    assert back.shape == SHAPE
    kept = np.zeros(SHAPE, bool)
    off = item["crop"].offset
    kept[:, -off[1] : -off[1] + 56, -off[2] : -off[2] + 40] = True
    np.testing.assert_array_equal(back.numpy()[kept], raw_label[kept])
    assert (back.numpy()[~kept] == 0).all()
    # Probabilities (K, D, H, W) come back too.
    assert uncrop(torch.ones(2, 64, 56, 40), item["crop"]).shape == (2, *SHAPE)
    with pytest.raises(ValueError, match="spatial shape"):
        uncrop(torch.ones(64, 56, 8), item["crop"])


@pytest.mark.parametrize("size", [7, (8, 8), (0, 8, 8), (8, 8, 12), 8.0])
def test_size_must_suit_the_unet(train, size):
    with pytest.raises(ValueError, match="divisible by 8"):
        SegmentationDataset(train, size=size)


def test_minmax_and_zscore(train, tmp_path):
    image = SegmentationDataset(train, normalise="minmax")[0]["image"]
    assert image.min() == 0 and image.max() == 1
    raw, affine = _raw(train[0].image)
    item = SegmentationDataset(train, normalise="zscore")[0]
    z = uncrop(item["image"][0].numpy(), item["crop"])
    brain = raw > 0
    assert abs(z[brain].mean()) < 1e-4 and abs(z[brain].std() - 1) < 1e-4
    assert (z[~brain] == 0).all()
    # With a mask, statistics come from the mask alone.
    mask = np.zeros(SHAPE, np.uint8)
    mask[10:40, 10:50, 10:40] = 1
    case = Case("m", train[0].image, train[0].label, _write(tmp_path / "m.nii.gz", mask, affine))
    item = SegmentationDataset([case], normalise="zscore")[0]
    z = uncrop(item["image"][0].numpy(), item["crop"])
    assert abs(z[mask == 1].mean()) < 1e-4 and abs(z[mask == 1].std() - 1) < 1e-4
    assert (z[mask == 0] == 0).all()
    same = SegmentationDataset(train, normalise=None)[0]["image"]
    np.testing.assert_array_equal(uncrop(same[0].numpy(), item["crop"]), raw)


def test_modality_from_4d_image(train, tmp_path):
    raw, affine = _raw(train[0].image)
    stack = np.stack([raw, 2 * raw + 5, -raw], axis=-1)  # (D, H, W, C), the Decathlon's order
    case = Case("4d", _write(tmp_path / "4d.nii.gz", stack, affine), train[0].label)
    every = SegmentationDataset([case], normalise=None)[0]["image"]
    assert every.shape == (3, *PADDED)
    one = SegmentationDataset([case], normalise=None, modality=1)[0]
    assert one["image"].shape == (1, *PADDED)
    np.testing.assert_allclose(uncrop(one["image"][0].numpy(), one["crop"]), 2 * raw + 5)
    with pytest.raises(DataError, match=r"4d\.nii\.gz.*modality 3 out of range"):
        SegmentationDataset([case], modality=3)[0]


def test_binarise_gives_whole_tumour(train):
    raw, _ = _raw(train[0].label)
    assert set(np.unique(raw)) == {0, 1, 2, 3}
    item = SegmentationDataset(train, classes=4, binarise=True)[0]
    assert set(item["label"].unique().tolist()) == {0, 1}
    np.testing.assert_array_equal(uncrop(item["label"], item["crop"]).numpy(), raw > 0)


def test_cache_returns_the_same_and_is_not_changed_by_callers(train):
    data = SegmentationDataset(train, cache=True)
    first = data[0]
    first["image"].zero_()
    again = data[0]
    assert again["image"].max() == 1
    assert torch.equal(again["image"], SegmentationDataset(train)[0]["image"])


# --- augmentation -----------------------------------------------------------------------------


def test_augmentation_off_by_default(train):
    data = SegmentationDataset(train)
    assert data.augmentation is None
    a, b = data[0], data[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_augmentation_differs_but_is_reproducible(train):
    plain = SegmentationDataset(train)
    first = SegmentationDataset(train, augment=True, seed=3)
    second = SegmentationDataset(train, augment=True, seed=3)
    items = [first[i]["image"] for i in range(3)]
    assert all(torch.equal(x, second[i]["image"]) for i, x in enumerate(items))
    assert any(not torch.equal(x, plain[i]["image"]) for i, x in enumerate(items))
    # Order of loading does not matter; a new epoch or seed draws anew.
    assert torch.equal(
        second[2]["image"], SegmentationDataset(train, augment=True, seed=3)[2]["image"]
    )
    second.set_epoch(1)
    other = SegmentationDataset(train, augment=True, seed=4)
    assert any(not torch.equal(x, second[i]["image"]) for i, x in enumerate(items))
    assert any(not torch.equal(x, other[i]["image"]) for i, x in enumerate(items))


def test_flips_move_image_and_label_together(train):
    flips = Augmentation(flip_prob=0.5, rotate_prob=0.0, intensity_prob=0.0)
    plain = SegmentationDataset(train, classes=4)[0]
    data = SegmentationDataset(train, classes=4, augment=flips, seed=0)
    seen = set()
    for epoch in range(6):
        data.set_epoch(epoch)
        item = data[0]
        # Find the set of flipped axes from the image, then check the label matches it.
        matches = [
            dims
            for dims in ([], [0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2])
            if torch.equal(item["image"], torch.flip(plain["image"], [d + 1 for d in dims]))
        ]
        assert len(matches) == 1, "augmented image is not a flip of the original"
        dims = matches[0]
        assert torch.equal(item["label"], torch.flip(plain["label"], dims))
        seen.add(tuple(dims))
    assert len(seen) > 1


def test_rotation_keeps_image_and_label_aligned(train, tmp_path):
    # An image that is its own label: after rotation both must still coincide.
    raw, affine = _raw(train[0].label)
    case = Case(
        "x", _write(tmp_path / "x.nii.gz", (raw > 0).astype(np.float32), affine), train[0].label
    )
    turn = Augmentation(flip_prob=0.5, rotate_prob=1.0, max_rotation_deg=15, intensity_prob=0.0)
    data = SegmentationDataset([case], normalise=None, binarise=True, augment=turn, seed=1)
    plain = SegmentationDataset([case], normalise=None, binarise=True)[0]
    item = data[0]
    assert not torch.equal(item["label"], plain["label"])  # it did move
    image, label = item["image"][0] > 0.5, item["label"] == 1
    dice = 2 * (image & label).sum() / (image.sum() + label.sum())
    assert dice > 0.9


def test_augmentation_settings_are_checked_and_shared_with_the_config():
    import unet3d.config

    assert Augmentation is unet3d.config.Augmentation  # the data API exports the config's
    with pytest.raises(ValueError, match=r"Augmentation\.flip_prob must be in \[0, 1\], got 2"):
        Augmentation(flip_prob=2)
    with pytest.raises(ValueError, match=r"Augmentation\.shift must be a finite number >= 0"):
        Augmentation(shift=-0.5)
    edges = Augmentation(flip_prob=0, rotate_prob=1, max_rotation_deg=0, scale=0, shift=0)
    assert edges.rotate_prob == 1  # the closed ends are allowed


# --- bad input --------------------------------------------------------------------------------


def _bad_case(train, tmp_path, kind):
    """A case with one defect, and the file its error must name."""
    image, affine = _raw(train[0].image)
    label, _ = _raw(train[0].label)
    path = tmp_path / f"{kind}.nii.gz"
    if kind == "shape":
        return Case(kind, train[0].image, _write(path, label[:-1], affine)), path
    if kind == "affine":
        moved = affine.copy()
        moved[0, 3] += 2.0
        return Case(kind, train[0].image, _write(path, label, moved)), path
    if kind == "nan":
        image = image.copy()
        image[5, 5, 5] = np.nan
        return Case(kind, _write(path, image, affine), train[0].label), path
    if kind == "outside":
        label = label.copy()
        label[0, 0, 0] = 7
        return Case(kind, train[0].image, _write(path, label, affine)), path
    if kind == "fraction":
        fractional = label.astype(np.float32)
        fractional[0, 0, 0] = 0.5
        return Case(kind, train[0].image, _write(path, fractional, affine)), path
    if kind == "negative":
        signed = label.astype(np.int16)
        signed[0, 0, 0] = -1
        return Case(kind, train[0].image, _write(path, signed, affine)), path
    if kind == "corrupt":
        path.write_bytes(b"not a nifti file")
        return Case(kind, path, train[0].label), path
    if kind == "missing":
        return Case(kind, path, train[0].label), path
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("shape", "shape"),
        ("affine", "affine"),
        ("nan", "non-finite"),
        ("outside", r"labels \[7\] outside"),
        ("fraction", "integers"),
        ("negative", r"labels \[-1\] outside"),
        ("corrupt", "cannot read"),
        ("missing", "not found"),
    ],
)
def test_bad_files_raise_naming_the_file(train, tmp_path, kind, message):
    case, culprit = _bad_case(train, tmp_path, kind)
    data = SegmentationDataset([case], classes=4)
    with pytest.raises(DataError, match=message) as error:
        data[0]
    assert str(culprit) in str(error.value)


def _index(root, **changes):
    index = json.loads((root / "dataset.json").read_text())
    index.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del index[key]
    (root / "dataset.json").write_text(json.dumps(index))


def test_bad_decathlon_folders(cohort, tmp_path):
    with pytest.raises(DataError, match=r"dataset\.json not found") as error:
        load_decathlon(tmp_path)
    assert str(tmp_path) in str(error.value)
    root = tmp_path / "copy"
    shutil.copytree(cohort, root)
    _index(root, training=[])
    with pytest.raises(DataError, match=r"dataset\.json: the 'training' split is missing or empty"):
        load_decathlon(root)
    _index(root, test=None)
    with pytest.raises(DataError, match="'test' split is missing"):
        load_decathlon(root, "test")
    _index(root, training=[{"image": "./imagesTr/nobody.nii.gz", "label": "./labelsTr/x.nii.gz"}])
    with pytest.raises(DataError, match=r"nobody\.nii\.gz: file not found"):
        load_decathlon(root)
    _index(root, training=[{"image": "./imagesTr/tumour_target_tr0000.nii.gz"}])
    with pytest.raises(DataError, match="has no 'label'"):
        load_decathlon(root)
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset\.json: cannot read"):
        load_decathlon(root)
    with pytest.raises(ValueError, match="split"):
        load_decathlon(cohort, "validation")


def test_bad_csv_tables(tmp_path, cohort):
    with pytest.raises(DataError, match=r"none\.csv: CSV file not found"):
        load_csv(tmp_path / "none.csv")
    table = tmp_path / "t.csv"
    table.write_text("image,label\n")
    with pytest.raises(DataError, match=r"t\.csv: no rows"):
        load_csv(table)
    table.write_text("picture,label\na.nii.gz,b.nii.gz\n")
    with pytest.raises(DataError, match=r"t\.csv: no column 'image'"):
        load_csv(table)
    table.write_text("image,label,split\na.nii.gz,b.nii.gz,train\n")
    with pytest.raises(DataError, match=r"a\.nii\.gz: file not found \(listed in .*t\.csv\)"):
        load_csv(table)
    with pytest.raises(DataError, match="no rows with split == 'test'"):
        load_csv(table, split="test")


def test_empty_dataset_and_unbatchable_items(train):
    with pytest.raises(DataError, match="no cases"):
        SegmentationDataset([])
    small = SegmentationDataset(train, size=32)[0]
    with pytest.raises(DataError, match="different shapes"):
        collate([small, SegmentationDataset(train)[1]])


# --- writing ----------------------------------------------------------------------------------


def test_nifti_round_trip_keeps_affine(tmp_path, train):
    theta = 0.3
    affine = np.array(
        [
            [2 * np.cos(theta), -2 * np.sin(theta), 0, -90.5],
            [2 * np.sin(theta), 2 * np.cos(theta), 0, 12.25],
            [0, 0, 3, -40],
            [0, 0, 0, 1],
        ]
    )
    probs = np.random.default_rng(0).random((6, 7, 8), dtype=np.float32)
    path = save_nifti(torch.from_numpy(probs), tmp_path / "p.nii.gz", affine)
    back = nib.load(path)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(back.get_fdata(dtype=np.float32), probs)
    assert [p.name for p in tmp_path.iterdir()] == ["p.nii.gz"]  # no temporary file left
    # A label map with the input's header: written as a small integer type, values as is.
    header = nib.load(train[0].image).header.copy()
    header.set_slope_inter(2.0, 1.0)
    labels = np.arange(6 * 7 * 8, dtype=np.int64).reshape(6, 7, 8) % 4
    back = nib.load(save_nifti(labels, tmp_path / "l.nii", affine, header=header))
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels)
    with pytest.raises(ValueError, match=r"\.nii"):
        save_nifti(labels, tmp_path / "l.png", affine)

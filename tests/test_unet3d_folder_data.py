"""Users' own folders: unet3d.cases.cases_from_patterns / load_images and the CLI options
over them (``unet3d train --image-pattern / --label-pattern``, ``unet3d predict --pattern /
--exclude``), and command-line errors that name the flag, not the Python argument."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from unet3d import cli
from unet3d.cases import DataError, cases_from_patterns, load_images
from unet3d.patterns import check_pattern, compile_pattern
from unet3d.preprocess import check_cases

WIDTHS = ["--widths", "2", "4", "4", "8"]
FLAGS = ("--image-pattern", "--label-pattern")


def _write(path: Path, label: bool = False, side: int = 4, seed: int = 0) -> Path:
    """A tiny NIfTI volume (noise, or its bright voxels as a label) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).normal(size=(side,) * 3).astype(np.float32)
    data = (image > 0.5).astype(np.uint8) if label else image
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _folder(root: Path, files: dict[str, bool], side: int = 4) -> Path:
    """``root`` holding ``{relative path: is a label}``, each file of its own noise."""
    for k, (rel, label) in enumerate(sorted(files.items())):
        _write(root / rel, label, side, seed=k)
    return root


def _brats(root: Path, n: int = 4, side: int = 4) -> Path:
    """BraTS layout: ``p<k>/p<k>_flair.nii.gz`` and ``p<k>/p<k>_seg.nii.gz``."""
    files = {
        f"p{k}/p{k}_{kind}.nii.gz": kind == "seg" for k in range(n) for kind in ("flair", "seg")
    }
    return _folder(root, files, side)


def _ids(cases: list) -> list[str]:
    return [c.id for c in cases]


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one ``error:`` line of a command that fails with status 2 (a usage error of
    argparse or an input error of the command)."""
    try:
        status = cli.main(argv)
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert status == cli.EXIT_ERROR, err
    lines = [line for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# The pattern syntax


@pytest.mark.parametrize(
    ("pattern", "path", "case_id"),
    [
        ("{id}_t1.nii.gz", "a_b_t1.nii.gz", "a_b"),
        ("{id}_*.nii.gz", "sub-01_ses-1_T1w.nii.gz", "sub-01_ses-1"),  # {id} as long as it can
        ("{id}/{id}_flair.nii.gz", "p01/p01_flair.nii.gz", "p01"),
        ("{id}/{id}_flair.nii.gz", "p01/p02_flair.nii.gz", None),  # every {id} the same
        ("*/{id}.nii.gz", "site/x.nii.gz", "x"),
        ("*/{id}.nii.gz", "x.nii.gz", None),  # * is one folder name, not none
        ("{id}.nii.gz", "site/x.nii.gz", None),  # {id} does not span folders
        ("**/{id}.nii.gz", "x.nii.gz", "x"),
        ("**/{id}.nii.gz", "a/b/x.nii.gz", "x"),
        ("[!a]{id}.nii", "bx.nii", "x"),
        ("[!a]{id}.nii", "ax.nii", None),
        ("case?{id}.nii", "case1_x.nii", "_x"),
        ("a[{id}.nii", "a[x.nii", "x"),  # an unclosed [ is itself
    ],
)
def test_pattern_syntax(pattern: str, path: str, case_id: str | None) -> None:
    check_pattern(pattern)
    match = compile_pattern(pattern).fullmatch(path)
    assert (match and match["id"]) == case_id


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("", "is empty"),
        ("/data/{id}.nii.gz", "is absolute"),
        ("../{id}.nii.gz", r"'\.\.' folder name"),
        ("a//{id}.nii.gz", "empty"),
        ("case.nii.gz", r"has no \{id\}: put \{id\} where the case id is"),
        ("[{id}].nii.gz", r"has no \{id\}"),  # a set's characters, not the id
        ("{ID}.nii.gz", r"braces are only allowed as \{id\}"),
        ("[z-a]{id}.nii", "not a valid pattern"),
    ],
)
def test_malformed_patterns_name_the_argument(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^image_pattern .*{message}|^image_pattern is empty"):
        check_pattern(pattern, "image_pattern")
    with pytest.raises(ValueError, match=message):
        cases_from_patterns(".", pattern, "{id}_seg.nii.gz")


# ---------------------------------------------------------------------------------------------
# cases_from_patterns


def test_flat_folder_with_other_files(tmp_path: Path) -> None:
    root = _folder(
        tmp_path, {f"c{k}_{m}.nii.gz": m == "seg" for k in (2, 1) for m in ("t1", "seg")}
    )
    (root / "notes.txt").write_text("not an image")
    _write(root / "._c1_t1.nii.gz")  # macOS's resource fork: hidden files never match
    _write(root / ".cache" / "c3_t1.nii.gz")  # nor anything in hidden folders
    cases = cases_from_patterns(root, "{id}_t1.nii.gz", "{id}_seg.nii.gz")
    assert _ids(cases) == ["c1", "c2"]  # sorted by id
    assert cases[0].image == root.resolve() / "c1_t1.nii.gz"
    assert cases[0].label == root.resolve() / "c1_seg.nii.gz" and cases[0].mask is None
    assert check_cases(cases) == 1  # the pairs share their grids


def test_labels_are_never_images(tmp_path: Path) -> None:
    # "{id}.nii.gz" also matches "c1_seg.nii.gz": the label pattern claims it first
    root = _folder(tmp_path, {"c1.nii.gz": False, "c1_seg.nii.gz": True, "c2.nii.gz": False,
                              "c2_seg.nii.gz": True})  # fmt: skip
    cases = cases_from_patterns(root, "{id}.nii.gz", "{id}_seg.nii.gz")
    assert _ids(cases) == ["c1", "c2"] and cases[1].label.name == "c2_seg.nii.gz"


@pytest.mark.parametrize(
    ("files", "patterns"),
    [
        (  # images/ and labels/ of one name (nnU-Net-like)
            {"images/c1.nii.gz": False, "images/c2.nii.gz": False, "labels/c1.nii.gz": True,
             "labels/c2.nii.gz": True},
            ("images/{id}.nii.gz", "labels/{id}.nii.gz"),
        ),
        (  # one folder per site, ids unique across sites
            {"siteA/c1_flair.nii.gz": False, "siteA/c1_seg.nii.gz": True,
             "siteB/c2_flair.nii.gz": False, "siteB/c2_seg.nii.gz": True},
            ("*/{id}_flair.nii.gz", "*/{id}_seg.nii.gz"),
        ),
        (  # BraTS: one folder per subject, named by its id
            {"c1/c1_flair.nii.gz": False, "c1/c1_seg.nii.gz": True, "c2/c2_flair.nii.gz": False,
             "c2/c2_seg.nii.gz": True, "c2/c9_flair.nii.gz": False},  # c9 in c2/: not a case
            ("{id}/{id}_flair.nii.gz", "{id}/{id}_seg.nii.gz"),
        ),
        (  # any depth
            {"a/b/c1.nii.gz": False, "c2.nii.gz": False, "masks/c1.nii.gz": True,
             "masks/c2.nii.gz": True},
            ("**/{id}.nii.gz", "masks/{id}.nii.gz"),
        ),
    ],
    ids=["images_labels", "sites", "brats", "any_depth"],
)  # fmt: skip
def test_subfolder_layouts(tmp_path: Path, files: dict[str, bool], patterns: tuple) -> None:
    root = _folder(tmp_path / "data", files)
    cases = cases_from_patterns(root, *patterns)
    assert _ids(cases) == ["c1", "c2"]
    for case in cases:
        assert case.image.is_file() and case.label.is_file() and case.image != case.label
        assert files[case.image.relative_to(root.resolve()).as_posix()] is False
        assert files[case.label.relative_to(root.resolve()).as_posix()] is True


def test_without_label_pattern_the_cases_are_unlabelled(tmp_path: Path) -> None:
    root = _brats(tmp_path, 2)
    cases = cases_from_patterns(root, "{id}/{id}_flair.nii.gz", None)
    assert _ids(cases) == ["p0", "p1"] and all(c.label is None for c in cases)


def test_links_to_folders_are_followed_but_never_in_circles(tmp_path: Path) -> None:
    root = _brats(tmp_path / "data", 2)
    elsewhere = _brats(tmp_path / "elsewhere", 3)
    os.symlink(elsewhere / "p2", root / "p2")  # a data set assembled from links
    os.symlink(root, root / "p0" / "loop")  # a link to a folder above: no endless walk
    cases = cases_from_patterns(root, "**/{id}_flair.nii.gz", "**/{id}_seg.nii.gz")
    assert _ids(cases) == ["p0", "p1", "p2"]


def _bad_folder(root: Path, case: str) -> tuple[Path, tuple[str, str]]:
    brats = ("{id}/{id}_flair.nii.gz", "{id}/{id}_seg.nii.gz")
    if case == "no_folder":
        return root / "nowhere", brats
    _brats(root, 5)
    if case == "no_image":
        return root, ("{id}/{id}_t1.nii.gz", brats[1])
    if case == "images_without_labels":
        for k in (1, 3, 4, 0):
            (root / f"p{k}" / f"p{k}_seg.nii.gz").unlink()
    elif case == "label_without_image":
        (root / "p2" / "p2_flair.nii.gz").unlink()
    elif case == "duplicate_images":
        return root, ("*/*_{id}.nii.gz", brats[1])  # ids "flair" and "seg"... and more
    elif case == "duplicate_labels":
        _write(root / "p3" / "p3_seg.nii", label=True)
        return root, (brats[0], "{id}/{id}_seg.nii*")
    return root, brats


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_folder", r"nowhere: no such folder$"),
        (
            "no_image",
            r"no image matches --image-pattern '\{id\}/\{id\}_t1\.nii\.gz' \(NIfTI files "
            r"there include p0/p0_flair\.nii\.gz, p0/p0_seg\.nii\.gz, p1/p1_flair\.nii\.gz\)",
        ),
        (
            "images_without_labels",
            r"4 of 5 images have no label matching --label-pattern '\{id\}/\{id\}_seg\.nii\.gz': "
            r"p0 \(p0/p0_flair\.nii\.gz\), p1 \(p1/p1_flair\.nii\.gz\), p3 "
            r"\(p3/p3_flair\.nii\.gz\) and 1 more; the label of p0 would be 'p0/p0_seg\.nii\.gz'",
        ),
        (
            "label_without_image",
            r"1 label\(s\) of --label-pattern '\{id\}/\{id\}_seg\.nii\.gz' have no image "
            r"matching --image-pattern '\{id\}/\{id\}_flair\.nii\.gz': p2 \(p2/p2_seg\.nii\.gz\)",
        ),
        (
            "duplicate_images",
            r"--image-pattern '\*/\*_\{id\}\.nii\.gz' finds several images for 1 id\(s\), e\.g\. "
            r"'flair': p0/p0_flair\.nii\.gz, p1/p1_flair\.nii\.gz, p2/p2_flair\.nii\.gz and 2 "
            r"more; each case needs an id of its own",
        ),
        (
            "duplicate_labels",
            r"--label-pattern '\{id\}/\{id\}_seg\.nii\*' finds several labels for 1 id\(s\), "
            r"e\.g\. 'p3': p3/p3_seg\.nii, p3/p3_seg\.nii\.gz;",
        ),
    ],
)
def test_folder_errors_name_the_folder_and_the_flag(
    tmp_path: Path, case: str, message: str
) -> None:
    root, patterns = _bad_folder(tmp_path / "data", case)
    with pytest.raises(DataError, match=message) as error:
        cases_from_patterns(root, *patterns, names=FLAGS)
    assert str(error.value).startswith(str(root)) and "\n" not in str(error.value)


def test_duplicate_images_count_every_shared_id(tmp_path: Path) -> None:
    root = _folder(tmp_path, {f"{site}/c{k}.nii.gz": False for site in "AB" for k in (1, 2, 3)})
    with pytest.raises(DataError, match=r"several images for 3 id\(s\), e\.g\. 'c1': A/c1"):
        cases_from_patterns(root, "*/{id}.nii.gz", None)


def test_the_same_pattern_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_pattern and label_pattern are the same"):
        cases_from_patterns(tmp_path, "{id}.nii.gz", "{id}.nii.gz")


# ---------------------------------------------------------------------------------------------
# load_images: folders searched with their subfolders


def _predict_folder(root: Path, side: int = 4) -> Path:
    files = {"a/x.nii.gz": False, "b/x.nii.gz": False, "y.nii": False, "a/x_seg.nii.gz": True}
    _folder(root, files, side)
    (root / "b" / "readme.txt").write_text("not an image")
    _write(root / ".trash" / "z.nii.gz", side=side)
    return root


def test_load_images_searches_subfolders(tmp_path: Path) -> None:
    root = _predict_folder(tmp_path)
    base = root.resolve()

    def found(*args: object, **kwargs: object) -> list[str]:
        return [c.image.relative_to(base).as_posix() for c in load_images(root, *args, **kwargs)]

    assert found() == ["a/x.nii.gz", "a/x_seg.nii.gz", "b/x.nii.gz", "y.nii"]
    assert found(exclude=["*_seg.nii.gz"]) == ["a/x.nii.gz", "b/x.nii.gz", "y.nii"]
    assert found(exclude=["a/*", "*.nii"]) == ["b/x.nii.gz"]  # a path, and a name anywhere
    assert found("*.nii*") == ["y.nii"]  # the top folder only
    assert found("*/x.nii.gz") == ["a/x.nii.gz", "b/x.nii.gz"]
    assert all(c.label is None for c in load_images(root))
    assert [c.id for c in load_images(root, "{id}/x.nii.gz")] == ["a", "b"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pattern": "*.mha"}, r"no file matches --pattern '\*\.mha' \(NIfTI files there"),
        ({"exclude": ["*"]}, r"all 4 files found are excluded by --exclude '\*'"),
        ({"pattern": "../*.nii"}, r"--pattern '\.\./\*\.nii' has an empty, '\.' or '\.\.'"),
    ],
)
def test_load_images_errors_name_the_flag(tmp_path: Path, kwargs: dict, message: str) -> None:
    root = _predict_folder(tmp_path)
    with pytest.raises(ValueError, match=message):
        load_images(root, **kwargs, names=("--pattern", "--exclude"))


def test_load_images_of_a_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("")
    with pytest.raises(DataError, match=r"no NIfTI files .* in this folder or below"):
        load_images(tmp_path)
    with pytest.raises(ValueError, match="pattern and exclude apply to a folder"):
        load_images(_write(tmp_path / "one.nii.gz"), "*.nii.gz")


# ---------------------------------------------------------------------------------------------
# The command line: train on a pattern folder, predict a folder tree


@pytest.fixture(scope="module")
def brats_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A BraTS-style folder of 16^3 cases and a 1-epoch run trained on it via the CLI."""
    root = tmp_path_factory.mktemp("folder")
    data = _brats(root / "brats", 4, side=16)
    argv = [
        "train", "--data", str(data), "--image-pattern", "{id}/{id}_flair.nii.gz",
        "--label-pattern", "{id}/{id}_seg.nii.gz", "--val-fraction", "0.25", *WIDTHS,
        "--size", "16", "--epochs", "1", "--batch-size", "1", "--out", str(root / "run"),
        "--no-progress",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    return data, root / "run"


def test_train_on_a_pattern_folder(brats_run: tuple[Path, Path]) -> None:
    run = brats_run[1]
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()
    record = json.loads((run / "config.json").read_text())
    ids = {c["id"] for c in record["train_cases"] + record["val_cases"]}
    assert ids == {"p0", "p1", "p2", "p3"} and len(record["val_cases"]) == 1
    case = record["train_cases"][0]
    assert case["label"] == case["image"].replace("_flair", "_seg")
    # a --resume with other patterns is told apart by the data fingerprint
    source = record["data"]["source"]
    assert source["--image-pattern"] == "{id}/{id}_flair.nii.gz"
    assert source["--label-pattern"] == "{id}/{id}_seg.nii.gz"


def test_predict_mirrors_the_subfolders(
    tmp_path: Path, brats_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root = _predict_folder(tmp_path / "in", side=16)
    checkpoint = str(brats_run[1] / "best.pt")

    def predict(out: Path, *extra: str) -> str:
        argv = ["predict", "--checkpoint", checkpoint, "--input", str(root), "--out", str(out)]
        assert cli.main([*argv, "--no-progress", *extra]) == 0
        return capsys.readouterr().err

    out = tmp_path / "out"
    assert "3 image(s)" in predict(out, "--exclude", "*_seg.nii.gz")
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz"))
    assert written == [
        f"{name}_{key}.nii.gz" for name in ("a/x", "b/x", "y") for key in ("mask", "mi", "prob")
    ]  # x of a/ and x of b/ apart; no a/x_seg, no hidden .trash/z
    a = np.asarray(nib.load(out / "a" / "x_prob.nii.gz").dataobj)
    b = np.asarray(nib.load(out / "b" / "x_prob.nii.gz").dataobj)
    assert a.shape == (16, 16, 16) and not np.array_equal(a, b)  # two images, two maps

    # --out inside --input: a second run does not predict the first one's maps
    inside = root / "pred"
    predict(inside, "--pattern", "**/x.nii.gz")
    assert "(6 earlier maps skipped)" in predict(inside)
    assert not (inside / "pred").exists()
    assert (inside / "a" / "x_seg_prob.nii.gz").is_file()  # no --exclude this time


def test_predict_refuses_maps_that_would_collide(
    tmp_path: Path, brats_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path / "in" / "x.nii", side=16)
    _write(tmp_path / "in" / "x.nii.gz", side=16)
    argv = ["predict", "--checkpoint", str(brats_run[1] / "best.pt"), "--input"]
    line = _error([*argv, str(tmp_path / "in"), "--out", str(tmp_path / "out")], capsys)
    assert "x.nii and " in line and "would both write" in line and "--exclude" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Errors that name the flag (status 2, one "error:" line)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--image-pattern", "case.nii.gz", "--label-pattern", "{id}_seg.nii.gz"],
         r"argument --image-pattern: the pattern 'case\.nii\.gz' has no \{id\}"),
        (["--image-pattern", "{id}_t1.nii.gz"], "--image-pattern and --label-pattern go together"),
        (["--image-pattern", "{id}.nii", "--label-pattern", "{id}.nii"], "are the same"),
        (["--image-pattern", "{id}.nii", "--label-pattern", "{id}_seg.nii", "--no-binarise"],
         "--image-pattern with --no-binarise needs --n-classes"),
        (["--size", "12"], "argument --size: must be a positive multiple of 8, got 12"),
        (["--size", "8"], "--size 8 leaves the U-Net one voxel at 1/8 resolution"),
        (["--n-classes", "1", "--no-binarise"], "argument --n-classes: must be at least 2"),
        (["--seed", "-1"], "argument --seed: must be a non-negative integer"),
        (["--strategy", "pretrained_frozen", "--source", "s.pt", "--trainable", "down1", "dwn2"],
         r"--trainable dwn2: no such block of the U-Net \(blocks: init_conv down1"),
    ],
)  # fmt: skip
def test_train_usage_errors_name_the_flag(
    tmp_path: Path, extra: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _error(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *extra], capsys)
    assert line.startswith("unet3d train: error: ")
    assert re.search(expected, line), line


def test_csv_with_patterns_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--csv", "c.csv", "--out", "o"]
    line = _error([*argv, "--image-pattern", "{id}.nii", "--label-pattern", "{id}_s.nii"], capsys)
    assert "--image-pattern needs --data DIR" in line


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--batch-size", "4"], "error: --batch-size 4 exceeds the 3 training cases"),
        (["--modality", "1"], r"p\d_flair\.nii\.gz: modality 1 out of range \(--modality"),
        (["--label-pattern", "{id}/{id}_t2.nii.gz"],
         r"error: .*brats: 4 of 4 images have no label matching --label-pattern"),
    ],
)  # fmt: skip
def test_train_input_errors_name_the_flag(
    tmp_path: Path,
    brats_run: tuple[Path, Path],
    extra: list[str],
    expected: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [
        "train", "--data", str(brats_run[0]), "--image-pattern", "{id}/{id}_flair.nii.gz",
        "--label-pattern", "{id}/{id}_seg.nii.gz", "--val-fraction", "0.25", *WIDTHS,
        "--size", "16", "--out", str(tmp_path / "run"), "--no-progress", *extra,
    ]  # fmt: skip
    line = _error(argv, capsys)
    assert re.search(expected, line), line
    assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--roi", "12"], "argument --roi: must be a multiple of 8, at least 16, got 12"),
        (["--pattern", "/abs/*.nii"], r"argument --pattern: the pattern '/abs/\*\.nii' is absolute"),
        (["--pattern", "*.mha"], r"^error: .*brats: no file matches --pattern '\*\.mha'"),
        (["--exclude", "*.nii*"], r"all 8 files found are excluded by --exclude '\*\.nii\*'"),
    ],
)  # fmt: skip
def test_predict_errors_name_the_flag(
    tmp_path: Path,
    brats_run: tuple[Path, Path],
    extra: list[str],
    expected: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["predict", "--checkpoint", str(brats_run[1] / "best.pt"), "--input"]
    argv += [str(brats_run[0]), "--out", str(tmp_path / "out"), *extra]
    line = _error(argv, capsys)
    assert re.search(expected, line), line


def test_predict_pattern_with_a_file_input_names_the_flags(
    tmp_path: Path, brats_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    image = brats_run[0] / "p0" / "p0_flair.nii.gz"
    argv = ["predict", "--checkpoint", str(brats_run[1] / "best.pt"), "--input", str(image)]
    line = _error([*argv, "--out", str(tmp_path), "--pattern", "*.nii.gz"], capsys)
    assert line == f"error: {image}: --pattern and --exclude apply to a folder"

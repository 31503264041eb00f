"""Synthetic cohorts on the MNI152 anatomy: determinism, labels, contrasts, tables, ageing,
caching."""

import csv
import hashlib
import json
import socket

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import cohorts
from cohorts import writer
from cohorts.ageing import age_tissues
from cohorts.anatomy import load_anatomy
from cohorts.subjects import TUMOUR_COHORTS

RES = 4  # mm: tests run on the 50 x 59 x 48 grid
TUMOURS = ("tumour_target", "tumour_t1")


def _sha(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _digests(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Every test here runs with the network blocked: the anatomy must come from the wheel."""

    def refuse(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_network_is_blocked():
    with pytest.raises(OSError, match="blocked"):
        socket.create_connection(("example.org", 80), timeout=1)


def test_anatomy_loads_offline():
    load_anatomy.cache_clear()  # really read the template files again, offline
    anatomy = load_anatomy(RES)
    assert anatomy.shape == (50, 59, 48)
    total = anatomy.csf + anatomy.gm + anatomy.wm
    np.testing.assert_allclose(total, anatomy.mask, atol=1e-5)
    assert anatomy.ventricles.sum() > 0
    assert (anatomy.gm * anatomy.ventricles).mean() < (anatomy.csf * anatomy.ventricles).mean()


@pytest.mark.parametrize("cohort", list(cohorts.COHORTS))
def test_subject_is_deterministic_and_seed_dependent(cohort):
    a = cohorts.subject(cohort, 1, RES, seed=3)
    b = cohorts.subject(cohort, 1, RES, seed=3)
    c = cohorts.subject(cohort, 1, RES, seed=4)
    d = cohorts.subject(cohort, 2, RES, seed=3)
    assert a["image"].dtype == np.float32 and a["label"].dtype == np.uint8
    assert a["image"].shape == a["label"].shape == load_anatomy(RES).shape
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert a["meta"] == b["meta"]
    assert not np.array_equal(a["image"], c["image"])
    assert not np.array_equal(a["image"], d["image"])


def test_train_and_test_streams_differ():
    train = cohorts.subject("ms_source", 0, RES, split="train")
    test = cohorts.subject("ms_source", 0, RES, split="test")
    assert train["id"] != test["id"]
    assert not np.array_equal(train["image"], test["image"])


def test_generate_is_bit_identical(tmp_path):
    paths = [
        cohorts.generate("ms_source", tmp_path / name, 2, 1, resolution=RES, seed=7, progress=False)
        for name in ("a", "b")
    ]
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    other = cohorts.generate(
        "ms_source", tmp_path / "c", 2, 1, resolution=RES, seed=8, progress=False
    )
    image = "imagesTr/ms_source_tr0000.nii.gz"
    assert _digests(tmp_path / "c")[image] != _digests(tmp_path / "a")[image]
    assert paths[0].name == other.name == "dataset.json"


def test_parallel_generation_writes_the_same_bytes(tmp_path, capsys):
    serial = tmp_path / "serial"
    cohorts.generate("ms_source", serial, 2, 1, resolution=RES, seed=5, progress=False)
    parallel = tmp_path / "parallel"
    cohorts.generate("ms_source", parallel, 2, 1, resolution=RES, seed=5, progress=False, jobs=2)
    expected = _digests(serial)
    assert {"dataset.json", "labelsTs/ms_source_ts0000.nii.gz"} <= set(expected)
    assert sum(name.startswith(".subjects/") for name in expected) == 3
    assert _digests(parallel) == expected
    # a grown cohort: the finished subject is read back, the others made by the workers
    grown = tmp_path / "grown"
    cohorts.generate("ms_source", grown, 1, resolution=RES, seed=5, progress=False)
    cohorts.generate("ms_source", grown, 2, 1, resolution=RES, seed=5, progress=False, jobs=3)
    assert _digests(grown) == expected

    for jobs in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="jobs"):
            cohorts.generate("ms_source", tmp_path / "x", 1, resolution=RES, jobs=jobs)
    assert not (tmp_path / "x").exists()
    from cohorts.cli import main

    argv = ["generate", "--cohort", "ms_source", "--n-train", "1", "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as error:
        main([*argv, "--resolution", "4", "--jobs", "0"])
    assert error.value.code == 2
    assert "jobs must be an integer >= 1" in capsys.readouterr().err


def test_ms_labels_align_with_drawn_lesions():
    flat = cohorts.subject("ms_source", 0, RES, seed=0, deformed=False)
    centres = flat["meta"]["lesion_centres"]
    assert 5 <= len(centres) <= 20
    for centre in centres:
        assert flat["label"][tuple(centre)] == 1
    for s in (flat, cohorts.subject("ms_source", 0, RES, seed=0)):
        lesion = s["label"] == 1
        wm = (s["tissues"]["wm"] > 0.9) & ~ndimage.binary_dilation(lesion, iterations=2)
        # FLAIR: lesions are clearly brighter than normal-appearing white matter.
        assert s["image"][lesion].mean() > 1.5 * s["image"][wm].mean()
        assert s["meta"]["count"] == ndimage.label(lesion)[1]


def test_tumour_cohorts():
    assert TUMOUR_COHORTS == TUMOURS
    assert cohorts.COHORTS["tumour_t1"].labels == cohorts.COHORTS["tumour_target"].labels
    assert cohorts.COHORTS["tumour_t1"].modality == "T1"


@pytest.mark.parametrize("cohort", TUMOURS)
def test_tumour_labels_are_nested_and_visible(cohort):
    s = cohorts.subject(cohort, 0, RES, seed=0)
    label = s["label"]
    assert set(np.unique(label)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(s["whole_tumour"], (label > 0).astype(np.uint8))
    # Core inside rim inside oedema: filling the core's holes never reaches the background.
    grown = ndimage.binary_dilation(label == 1)
    assert not (grown & (label == 0)).any()
    assert ndimage.label(label > 0)[1] == 1
    flat = cohorts.subject(cohort, 0, RES, seed=0, deformed=False)
    assert flat["label"][tuple(flat["meta"]["tumour"]["centre_index"])] == 1


def test_tumour_contrast_t2_bright_t1_dark():
    def means(cohort):
        s = cohorts.subject(cohort, 0, RES, seed=0)
        label, image = s["label"], s["image"]
        wm = (s["tissues"]["wm"] > 0.9) & ~ndimage.binary_dilation(label > 0, iterations=2)
        return image[label == 1].mean(), image[label == 3].mean(), image[wm].mean()

    core, oedema, wm = means("tumour_target")
    assert core > 1.5 * wm and oedema > 1.5 * wm  # T2: core and oedema bright
    core, oedema, wm = means("tumour_t1")
    assert core < 0.7 * wm and oedema < wm  # T1: the tumour is darker than white matter


def test_tumour_target_output_is_unchanged(tmp_path):
    """Values recorded before ``tumour_t1`` was added: adding a cohort (and its contrast)
    changes neither the subjects nor the configuration hash of ``tumour_target``.

    Summaries with tolerances rather than checksums: a fresh install may resolve other
    NumPy / SciPy / torch builds, whose interpolation differs in the last bits; a change of
    the random draws (what this guards against) moves them by far more."""
    s = cohorts.subject("tumour_target", 0, RES, seed=0)
    image = s["image"].astype(np.float64)
    assert image.mean() == pytest.approx(0.12722475507644224, rel=1e-5)
    assert image.std() == pytest.approx(0.19774757272457977, rel=1e-5)
    counts = [int((s["label"] == v).sum()) for v in range(4)]
    assert counts[1:] == pytest.approx([46, 192, 807], abs=3)  # core, rim, oedema voxels
    cohorts.generate("tumour_target", tmp_path, 1, resolution=RES, seed=0, progress=False)
    config = json.loads((tmp_path / "cohort.json").read_text())
    assert config["config_hash"] == "70a321e514a21bcd" and config["labels"] == "multi"
    written = nib.load(tmp_path / "imagesTr/tumour_target_tr0000.nii.gz")
    assert _sha(np.asarray(written.dataobj)) == _sha(s["image"])


def test_lesion_count_table_matches_label_maps(tmp_path):
    path = cohorts.generate("lesion_count", tmp_path, 4, 2, resolution=RES, seed=1, progress=False)
    rows = list(csv.DictReader(path.open()))
    assert [r["split"] for r in rows] == ["train"] * 4 + ["test"] * 2
    for row in rows:
        label = np.asarray(nib.load(tmp_path / row["label"]).dataobj)
        _, count = ndimage.label(label)
        assert int(row["count"]) == count
        assert float(row["volume_mm3"]) == pytest.approx(label.sum() * RES**3)
        meta = json.loads((tmp_path / ".subjects" / f"{row['id']}.json").read_text())
        assert meta["drawn_count"] == count  # every drawn lesion is its own component
    assert len({r["count"] for r in rows}) > 1


def test_brain_age_effect_is_monotone():
    ages = [20, 30, 40, 50, 60, 70, 80, 90]
    anatomy = load_anatomy(RES)
    csf, gm, ventricles = [], [], []
    for age in ages:
        s = cohorts.subject("brain_age", 0, RES, seed=0, age=age, sex="F")
        csf.append(s["tissues"]["csf"].sum())
        gm.append(s["tissues"]["gm"].sum())
        template = age_tissues(anatomy, age)
        ventricles.append(template["csf"][anatomy.ventricle_distance <= 10].sum())
    assert np.all(np.diff(csf) > 0) and np.all(np.diff(gm) < 0)
    assert np.all(np.diff(ventricles) > 0)
    assert ventricles[-1] > 1.3 * ventricles[0]
    # Images differ only through age: same deformation and noise draws.
    young = cohorts.subject("brain_age", 0, RES, seed=0, age=20, sex="F")
    old = cohorts.subject("brain_age", 0, RES, seed=0, age=90, sex="F")
    changed = np.abs(young["image"] - old["image"]) > 0.05
    assert (changed & (old["label"] > 0)).sum() > 0.7 * changed.sum()


def test_sex_scales_the_brain():
    female = cohorts.subject("brain_age", 0, RES, seed=0, age=50, sex="F")
    male = cohorts.subject("brain_age", 0, RES, seed=0, age=50, sex="M")
    volume = [sum(s["tissues"][k].sum() for k in ("csf", "gm", "wm")) for s in (female, male)]
    assert 1.05 < volume[1] / volume[0] < 1.15


def test_brain_age_table_and_ageing_map(tmp_path):
    path = cohorts.generate("brain_age", tmp_path, 3, resolution=RES, seed=0, progress=False)
    rows = list(csv.DictReader(path.open()))
    assert {r["sex"] for r in rows} <= {"F", "M"}
    assert all(18 <= float(r["age"]) <= 90 for r in rows)
    ageing = nib.load(tmp_path / "ageing_map.nii.gz")
    assert set(np.unique(np.asarray(ageing.dataobj))) == {0, 1, 2}


@pytest.mark.parametrize(("cohort", "modality"), [("tumour_target", "T2"), ("tumour_t1", "T1")])
def test_monai_reads_dataset_json(tmp_path, cohort, modality):
    from monai.data import load_decathlon_datalist

    path = cohorts.generate(
        cohort, tmp_path, 2, 1, resolution=RES, progress=False, whole_tumour=True
    )
    training = load_decathlon_datalist(path, data_list_key="training")
    test = load_decathlon_datalist(path, data_list_key="test")
    assert len(training) == 2 and len(test) == 1
    image = nib.load(training[0]["image"])
    label = nib.load(training[0]["label"])
    expected = load_anatomy(RES).affine
    np.testing.assert_array_equal(image.affine, expected)
    np.testing.assert_array_equal(label.affine, expected)
    assert np.diag(expected)[:3].tolist() == [RES] * 3
    assert image.get_data_dtype() == np.float32
    assert set(np.unique(np.asarray(label.dataobj))) == {0, 1}
    index = json.loads(path.read_text())
    assert index["labels"] == {"0": "background", "1": "tumour"}
    assert index["name"] == cohort and index["modality"] == {"0": modality}
    assert index["generator"]["labels"] == "whole"
    assert training[0]["image"].endswith(f"imagesTr/{cohort}_tr0000.nii.gz")
    assert (tmp_path / f"labelsTs/{cohort}_ts0000.nii.gz").exists()


def test_interrupted_generation_resumes_to_the_same_files(tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    cohorts.generate("ms_source", reference, 3, 1, resolution=RES, progress=False)
    original = writer._write_subject
    calls = {"n": 0}

    def crash_after_two(*args, **kwargs):
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(writer, "_write_subject", crash_after_two)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        cohorts.generate("ms_source", resumed, 3, 1, resolution=RES, progress=False)
    monkeypatch.setattr(writer, "_write_subject", original)
    written = []
    monkeypatch.setattr(
        writer,
        "_write_subject",
        lambda out, record, *a: written.append(record["id"]) or original(out, record, *a),
    )
    cohorts.generate("ms_source", resumed, 3, 1, resolution=RES, progress=False)
    assert written == ["ms_source_tr0002", "ms_source_ts0000"]  # finished subjects skipped
    assert _digests(resumed) == _digests(reference)


def test_growing_a_cohort_keeps_its_subjects(tmp_path):
    small = cohorts.generate("ms_source", tmp_path, 1, resolution=RES, progress=False)
    first = _digests(tmp_path)["imagesTr/ms_source_tr0000.nii.gz"]
    cohorts.generate("ms_source", tmp_path, 2, resolution=RES, progress=False)
    assert _digests(tmp_path)["imagesTr/ms_source_tr0000.nii.gz"] == first
    assert len(json.loads(small.read_text())["training"]) == 2


def test_config_mismatch_needs_overwrite(tmp_path):
    cohorts.generate("ms_source", tmp_path, 1, resolution=RES, seed=0, progress=False)
    with pytest.raises(ValueError, match=r"another configuration.*seed"):
        cohorts.generate("ms_source", tmp_path, 1, resolution=RES, seed=1, progress=False)
    cohorts.generate(
        "ms_source", tmp_path, 1, resolution=RES, seed=1, overwrite=True, progress=False
    )
    assert json.loads((tmp_path / "cohort.json").read_text())["seed"] == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("user data")
    with pytest.raises(ValueError, match="not a cohort folder"):
        cohorts.generate("ms_source", tmp_path / "other", 1, resolution=RES, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_train": 0, "n_test": 0}, "n_train \\+ n_test"),
        ({"n_train": -1}, "n_train"),
        ({"n_test": 1.5}, "n_test"),
        ({"cohort": "brats"}, "unknown cohort 'brats'; known cohorts: ms_source"),
        ({"resolution": 0.5}, "resolution must be one of"),
        ({"resolution": 2.5}, "resolution must be one of"),
        ({"resolution": "fine"}, "resolution must be one of"),
        (
            {"whole_tumour": True},
            "whole_tumour=True applies to the 'tumour_target' and 'tumour_t1'",
        ),
    ],
)
def test_bad_arguments_raise(tmp_path, kwargs, match):
    arguments = {"cohort": "ms_source", "out_dir": tmp_path / "x", "n_train": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        cohorts.generate(**arguments)
    assert not (tmp_path / "x").exists()  # nothing written before the arguments are checked


def test_subject_bad_arguments():
    with pytest.raises(ValueError, match="unknown cohort"):
        cohorts.subject("nope", 0, RES)
    with pytest.raises(ValueError, match="resolution"):
        cohorts.subject("ms_source", 0, 5)
    with pytest.raises(ValueError, match="age and sex"):
        cohorts.subject("ms_source", 0, RES, age=40)
    with pytest.raises(ValueError, match="index"):
        cohorts.subject("ms_source", -1, RES)


def test_cli_generate_and_errors(tmp_path, capsys):
    from cohorts.cli import main

    out = tmp_path / "cli"
    argv = ["generate", "--cohort", "lesion_count", "--n-train", "1", "--out", str(out)]
    assert main([*argv, "--resolution", "4", "--seed", "2", "--quiet"]) == 0
    assert (out / "subjects.csv").exists()
    with pytest.raises(SystemExit) as error:
        main([*argv, "--resolution", "7"])
    assert error.value.code == 2
    assert "resolution must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--cohort", "x", "--n-train", "1", "--out", str(out)])
    assert "known cohorts" in capsys.readouterr().err
    assert main(["list"]) == 0
    assert "tumour_t1" in capsys.readouterr().out

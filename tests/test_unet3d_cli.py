"""unet3d.cli (``unet3d train | predict``, ``python -m unet3d``) and unet3d.checkpoint.load_model."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from decathlon import write_decathlon

import dwp
import unet3d.train
from unet3d import cli
from unet3d.checkpoint import CheckpointError, load_model
from unet3d.cli.arguments import augmentation_of
from unet3d.config import Augmentation

REPO = Path(__file__).resolve().parents[1]
WIDTHS = ["--widths", "2", "4", "4", "8"]
#: A test image of another shape than the training crops, on an oblique-free but shifted grid.
TEST_SHAPE = (20, 18, 16)
AFFINE = np.array(
    [[2.0, 0, 0, -10.0], [0, 2.0, 0, 5.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1]], dtype=np.float64
)


def _write_decathlon(root: Path, n_train: int = 4, seed: int = 0) -> Path:
    return write_decathlon(root, n_train, seed=seed, affine=AFFINE, test_shape=TEST_SHAPE)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def _train_argv(data: Path, out: Path, *extra: str, epochs: int = 1) -> list[str]:
    return [
        "train", "--data", str(data), "--val-fraction", "0.25", *WIDTHS, "--size", "16",
        "--epochs", str(epochs), "--lr", "1e-2", "--batch-size", "1", "--out", str(out),
        "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_decathlon(tmp_path_factory.mktemp("decathlon") / "data")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data: Path) -> dict[str, Path]:
    """One deterministic and one Bayesian run of one epoch (shared by the predict tests)."""
    root = tmp_path_factory.mktemp("runs")
    assert cli.main(_train_argv(data, root / "ri")) == 0
    bayes = ["--strategy", "normal_prior", "--beta", "1e-3", "--init-log-sigma", "-3"]
    assert cli.main(_train_argv(data, root / "np", *bayes)) == 0
    return {"random_init": root / "ri", "normal_prior": root / "np"}


# ---------------------------------------------------------------------------------------------
# Entry points


def test_python_m_unet3d_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "unet3d", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "predict" in done.stdout


def test_console_script_is_declared() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert 'unet3d = "unet3d.cli:main"' in text


@pytest.mark.parametrize("command", ["train", "predict"])
def test_subcommand_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert "--out" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# train


def test_train_writes_metrics_checkpoints_and_config(runs: dict[str, Path], data: Path) -> None:
    out = runs["random_init"]
    assert {"metrics.csv", "metrics.json", "best.pt", "last.pt", "config.json"} <= {
        p.name for p in out.iterdir()
    }
    record = json.loads((out / "config.json").read_text())
    assert record["command"].startswith("unet3d train --data")
    assert record["config"]["widths"] == [2, 4, 4, 8] and record["config"]["size"] == 16
    assert record["strategy"]["name"] == "random_init"
    # --val-fraction 0.25 of 4 cases: a seeded 3 / 1 split, disjoint
    train_ids = {c["id"] for c in record["train_cases"]}
    val_ids = {c["id"] for c in record["val_cases"]}
    assert len(train_ids) == 3 and len(val_ids) == 1 and not train_ids & val_ids
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 1 and "val_dice" in rows[0]
    # best.pt carries what load_model needs to rebuild the network
    best = torch.load(out / "best.pt", weights_only=True)
    assert json.loads(best["config"])["widths"] == [2, 4, 4, 8]
    assert json.loads(best["strategy"])["name"] == "random_init"


def test_train_l2_sp_with_alpha_and_any_prior_file(
    tmp_path: Path, runs: dict[str, Path], data: Path
) -> None:
    source = runs["random_init"] / "last.pt"
    out = tmp_path / "l2sp"
    argv = _train_argv(data, out, "--strategy", "l2_sp", "--source", str(source), "--alpha", "0.5")
    assert cli.main(argv) == 0
    record = json.loads((out / "config.json").read_text())
    assert record["strategy"]["name"] == "l2_sp" and record["strategy"]["alpha"] == 0.5
    assert "train_l2_sp" in next(csv.DictReader((out / "metrics.csv").open()))
    prior = tmp_path / "normal.pt"
    dwp.NormalPrior(0.0, 0.1, learn_scale=True).save(prior)
    out = tmp_path / "prior"
    assert cli.main(_train_argv(data, out, "--strategy", "prior", "--prior", str(prior))) == 0
    record = json.loads((out / "config.json").read_text())
    assert record["strategy"]["name"] == "prior" and record["strategy"]["prior"] == str(prior)
    assert load_model(out / "last.pt").bayesian


def test_train_from_csv_with_validation_csv(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = tmp_path / "cases.csv"
    lines = ["image,label,split"] + [
        f"{data}/imagesTr/case{i}.nii.gz,{data}/labelsTr/case{i}.nii.gz,"
        f"{'val' if i == 3 else 'train'}"
        for i in range(4)
    ]
    table.write_text("\n".join(lines) + "\n")
    argv = [
        "train", "--csv", str(table), "--split", "train", "--val-csv", str(table),
        "--val-split", "val", *WIDTHS, "--epochs", "1", "--batch-size", "2",
        "--out", str(tmp_path / "run"), "--no-progress",
    ]  # fmt: skip
    status, _, err = _run(argv, capsys)
    assert status == 0, err
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert [c["id"] for c in record["val_cases"]] == ["case3"]
    assert len(record["train_cases"]) == 3


def test_resume_after_interrupt_equals_uninterrupted(
    tmp_path: Path,
    data: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # weight noise (normal_prior) makes the RNG state part of what must be resumed
    extra = ("--strategy", "normal_prior", "--init-log-sigma", "-3")
    full_argv = _train_argv(data, tmp_path / "full", *extra, epochs=2)
    assert _run(full_argv, capsys)[0] == 0

    real_train = unet3d.train.train

    def interrupted_after_first_epoch(*args, **kwargs):
        def stop(epoch: int, record: dict) -> None:
            raise KeyboardInterrupt  # as Ctrl-C after epoch 0's files are written

        return real_train(*args, **kwargs, on_epoch_end=stop)

    cut_argv = _train_argv(data, tmp_path / "cut", *extra, epochs=2)
    monkeypatch.setattr(unet3d.train, "train", interrupted_after_first_epoch)
    status, _, err = _run(cut_argv, capsys)
    assert status == cli.EXIT_INTERRUPTED and "--resume" in err
    monkeypatch.undo()
    assert len(json.loads((tmp_path / "cut" / "metrics.json").read_text())) == 1

    status, _, err = _run([*cut_argv, "--resume"], capsys)
    assert status == 0, err
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert resumed["epoch"] == full["epoch"] == 2
    assert full["model"].keys() == resumed["model"].keys()
    for key, value in full["model"].items():
        if isinstance(value, torch.Tensor):  # (priors' _extra_state entries are dicts)
            assert torch.equal(value, resumed["model"][key]), key


def test_resume_accepts_a_run_from_before_a_setting_existed(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A setting added since a run started is missing from its stored config: it had the
    default value then, so a ``--resume`` with the default is the same run."""
    argv = _train_argv(data, tmp_path / "run", epochs=1)
    assert cli.main(argv) == 0
    last = tmp_path / "run" / "last.pt"
    state = torch.load(last, weights_only=True)
    config = json.loads(state["config"])
    for key in ("swag_rank", "swag_start", "swag_every", "scale_rate", "augmentation"):
        del config[key]
    torch.save({**state, "config": json.dumps(config)}, last)
    status, _, err = _run([*argv, "--resume"], capsys)
    assert status == 0, err


def test_resume_with_other_settings_names_the_difference(
    runs: dict[str, Path], data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = _run([*_train_argv(data, runs["random_init"], epochs=3), "--resume"], capsys)
    assert status == cli.EXIT_ERROR
    assert "last.pt" in err and "epochs: 1 -> 3" in err and "Traceback" not in err


def test_augment_options_reach_the_config_and_the_training_set_only(
    tmp_path: Path,
    data: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_train, seen = unet3d.train.train, {}

    def spy(config, train_set, val_set, **kwargs):
        seen.update(config=config, train_set=train_set, val_set=val_set)
        return real_train(config, train_set, val_set, **kwargs)

    monkeypatch.setattr(unet3d.train, "train", spy)
    tuned = ("--augment", "--flip-prob", "0.25", "--intensity-scale", "0.2", "--seed", "3")
    argv = _train_argv(data, tmp_path / "run", *tuned)
    status, _, err = _run(argv, capsys)
    assert status == 0, err
    expected = Augmentation(flip_prob=0.25, scale=0.2)  # the options not given: defaults
    assert seen["config"].augmentation == expected
    assert seen["train_set"].augmentation == expected and seen["train_set"].seed == 3
    assert seen["val_set"].augmentation is None
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    last = json.loads(torch.load(tmp_path / "run" / "last.pt", weights_only=True)["config"])
    assert stored["augmentation"] == last["augmentation"] == {
        "flip_prob": 0.25, "rotate_prob": 0.2, "max_rotation_deg": 10.0,
        "intensity_prob": 0.5, "scale": 0.2, "shift": 0.1,
    }  # fmt: skip
    # a --resume with other augmentation is another run
    status, _, err = _run([*_train_argv(data, tmp_path / "run", "--seed", "3"), "--resume"], capsys)
    assert status == cli.EXIT_ERROR and "augmentation: {'flip_prob': 0.25" in err
    assert "-> None" in err


def test_augment_alone_takes_the_defaults_and_is_off_without_it() -> None:
    def parsed(*extra: str):
        return cli.build_parser().parse_args(["train", "--data", "d", "--out", "o", *extra])

    assert augmentation_of(parsed("--augment")) == Augmentation()
    assert augmentation_of(parsed()) is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--flip-prob", "0.3"], "--flip-prob needs --augment"),
        (["--rotate-prob", "0", "--intensity-shift", "0"], "--rotate-prob --intensity-shift need"),
        (["--augment", "--flip-prob", "1.5"], "argument --flip-prob: must be in [0, 1], got 1.5"),
        (["--augment", "--intensity-prob", "-0.1"], "argument --intensity-prob: must be in [0, 1]"),
        (
            ["--augment", "--intensity-scale", "-1"],
            "argument --intensity-scale: must be a number >=",
        ),
        (
            ["--augment", "--max-rotation-deg", "inf"],
            "argument --max-rotation-deg: must be a finite",
        ),
        (["--augment", "--intensity-shift", "x"], "argument --intensity-shift: must be a number"),
    ],
)
def test_bad_augmentation_options_are_usage_errors_naming_the_option(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--data", "d", "--out", "o", *extra])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "usage: unet3d train" in err
    assert f"error: {message}" in err


# ---------------------------------------------------------------------------------------------
# predict


def _maps(out: Path, case_id: str) -> dict[str, nib.Nifti1Image]:
    return {key: nib.load(out / f"{case_id}_{key}.nii.gz") for key in ("prob", "mask", "mi")}


def test_predict_bayesian_writes_three_maps_on_the_input_grid(
    tmp_path: Path, runs: dict[str, Path], data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def argv(out: Path) -> list[str]:
        return [
            "predict", "--checkpoint", str(runs["normal_prior"] / "best.pt"),
            "--input", str(data), "--out", str(out), "--samples", "3", "--roi", "16",
            "--overlap", "0.25", "--no-progress",
        ]  # fmt: skip

    status, out, err = _run(argv(tmp_path / "first"), capsys)
    assert status == 0, err
    assert "Bayesian, 3 samples" in err and "test0_mi.nii.gz" in out
    maps = _maps(tmp_path / "first", "test0")
    for image in maps.values():
        assert image.shape == TEST_SHAPE
        np.testing.assert_allclose(image.affine, AFFINE)
    prob, mask, mi = (np.asarray(maps[k].dataobj) for k in ("prob", "mask", "mi"))
    assert prob.dtype == np.float32 and mask.dtype == np.uint8 and mi.dtype == np.float32
    assert 0 <= prob.min() and prob.max() <= 1 and set(np.unique(mask)) <= {0, 1}
    assert mi.min() >= 0 and mi.max() > 0  # posterior samples disagree somewhere
    # the same seed gives the same maps
    assert _run(argv(tmp_path / "again"), capsys)[0] == 0
    again = np.asarray(nib.load(tmp_path / "again" / "test0_mi.nii.gz").dataobj)
    np.testing.assert_array_equal(again, mi)


def test_predict_deterministic_file_and_folder(
    tmp_path: Path, runs: dict[str, Path], data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = str(runs["random_init"] / "last.pt")
    image = data / "imagesTs" / "test0.nii.gz"
    for source, out in ((image, tmp_path / "one"), (image.parent, tmp_path / "folder")):
        argv = ["predict", "--checkpoint", checkpoint, "--input", str(source)]
        status, _, err = _run([*argv, "--out", str(out), "--no-progress"], capsys)
        assert status == 0, err
        assert "deterministic" in err
        maps = _maps(out, "test0")
        np.testing.assert_allclose(maps["prob"].affine, AFFINE)
        assert not np.asarray(maps["mi"].dataobj).any()  # one pass: no epistemic part
    np.testing.assert_array_equal(
        np.asarray(nib.load(tmp_path / "one" / "test0_prob.nii.gz").dataobj),
        np.asarray(nib.load(tmp_path / "folder" / "test0_prob.nii.gz").dataobj),
    )


def test_dwp_checkpoint_predicts_without_its_prior_file(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    prior = tmp_path / "prior.pt"
    dwp.DeepWeightPrior({"g": dwp.KernelVAE((3, 3, 3), hidden=4)}).save(prior)
    argv = _train_argv(data, tmp_path / "run", "--strategy", "dwp", "--prior", str(prior))
    assert _run(argv, capsys)[0] == 0
    prior.unlink()  # prediction never evaluates the prior
    trained = load_model(tmp_path / "run" / "best.pt")
    assert trained.bayesian and trained.strategy["name"] == "dwp"
    reference = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["model"]
    state = trained.model.state_dict()
    for key, value in reference.items():
        if "_prior." not in key and isinstance(value, torch.Tensor):
            assert torch.equal(state[key], value), key
    argv = [
        "predict", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--input", str(data),
        "--out", str(tmp_path / "pred"), "--samples", "2", "--no-progress",
    ]  # fmt: skip
    status, _, err = _run(argv, capsys)
    assert status == 0, err
    assert (tmp_path / "pred" / "test0_mi.nii.gz").is_file()


def test_load_model_reads_the_config_of_an_old_best_pt_from_last_pt(
    tmp_path: Path, runs: dict[str, Path]
) -> None:
    # best.pt as written before it carried the config: model, epoch and metrics only
    new = torch.load(runs["normal_prior"] / "best.pt", weights_only=True)
    old = {k: new[k] for k in ("model", "epoch", "metrics")}
    run = tmp_path / "run"
    run.mkdir()
    torch.save(old, run / "best.pt")
    with pytest.raises(CheckpointError, match=r"best\.pt: no training config"):
        load_model(run / "best.pt")
    (run / "last.pt").write_bytes((runs["normal_prior"] / "last.pt").read_bytes())
    trained = load_model(run / "best.pt")
    assert trained.bayesian and trained.config["widths"] == [2, 4, 4, 8]
    assert trained.epoch == new["epoch"]
    assert not trained.model.training


def test_load_model_rejects_weights_of_another_network(tmp_path: Path, runs: dict[str, Path]):
    payload = torch.load(runs["random_init"] / "best.pt", weights_only=True)
    config = json.loads(payload["config"])
    config["widths"] = [4, 8, 8, 16]
    payload["config"] = json.dumps(config)
    torch.save(payload, tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match=r"best\.pt: the weights do not fit"):
        load_model(tmp_path / "best.pt")


# ---------------------------------------------------------------------------------------------
# Readable errors: status 2, one line naming the file, no traceback


def _corrupt(path: Path) -> Path:
    path.write_bytes(b"not a checkpoint at all")
    return path


@pytest.mark.parametrize(
    "case",
    ["missing_checkpoint", "corrupt_checkpoint", "missing_input", "empty_input_folder"],
)
def test_predict_errors_name_the_file(
    case: str,
    tmp_path: Path,
    runs: dict[str, Path],
    data: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    checkpoint, source = runs["random_init"] / "best.pt", data
    if case == "missing_checkpoint":
        checkpoint = named = tmp_path / "nope.pt"
    elif case == "corrupt_checkpoint":
        checkpoint = named = _corrupt(tmp_path / "broken.pt")
    elif case == "missing_input":
        source = named = tmp_path / "nowhere.nii.gz"
    else:
        source = named = tmp_path / "empty"
        source.mkdir()
    argv = ["predict", "--checkpoint", str(checkpoint), "--input", str(source)]
    status, _, err = _run([*argv, "--out", str(tmp_path / "out"), "--no-progress"], capsys)
    assert status == cli.EXIT_ERROR
    assert err.startswith("error: ") and str(named) in err and "Traceback" not in err


@pytest.mark.parametrize(
    "case", ["missing_data", "missing_prior", "corrupt_source", "source_of_other_widths"]
)
def test_train_errors_name_the_file(
    case: str,
    tmp_path: Path,
    runs: dict[str, Path],
    data: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    if case == "missing_data":
        named = tmp_path / "no_data" / "dataset.json"
        argv = _train_argv(tmp_path / "no_data", out)
    elif case == "missing_prior":
        named = tmp_path / "prior.pt"
        argv = _train_argv(data, out, "--strategy", "dwp", "--prior", str(named))
    else:
        named = (
            _corrupt(tmp_path / "source.pt")
            if case == "corrupt_source"
            else runs["random_init"] / "best.pt"
        )
        argv = _train_argv(data, out, "--strategy", "pretrained", "--source", str(named))
        if case == "source_of_other_widths":
            argv += ["--widths", "4", "8", "8", "16"]  # the last --widths wins
    status, _, err = _run(argv, capsys)
    assert status == cli.EXIT_ERROR, err
    assert err.startswith("error: ") and str(named) in err and "Traceback" not in err
    assert not (out / "last.pt").exists()


def test_an_optimizer_that_does_not_fit_the_strategy_is_named(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    status, _, err = _run(_train_argv(data, out, "--optimizer", "natural"), capsys)
    assert status == cli.EXIT_ERROR, err
    assert err.startswith("error: optimizer 'natural' updates posterior scales") and (
        "Traceback" not in err
    )
    assert not (out / "last.pt").exists()


def test_bayesian_runs_learn_their_scales_by_default(runs: dict[str, Path]) -> None:
    """``--optimizer auto`` is the natural-gradient path for normal_prior: after one epoch
    (2 steps) the scales have moved off their initial -3, differently per weight."""
    state = torch.load(runs["normal_prior"] / "last.pt", weights_only=True)
    config = json.loads(state["config"])
    assert config["optimizer"] == "auto" and config["scale_rate"] == 0.1
    sigmas = torch.cat([v.flatten() for k, v in state["model"].items() if k.endswith("_log_sigma")])
    assert (sigmas + 3.0).abs().mean() > 1e-3 and sigmas.std() > 1e-4


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data", "d", "--out", "o", "--prior", "p.pt"],  # not random_init's
        ["train", "--data", "d", "--out", "o", "--optimizer", "ivon"],  # not in unet3d
        ["train", "--data", "d", "--out", "o", "--scale-rate", "1.5"],
        ["train", "--data", "d", "--out", "o", "--init-log-sigma", "he"],
        ["train", "--data", "d", "--out", "o", "--strategy", "pretrained"],  # no --source
        ["train", "--data", "d", "--out", "o", "--strategy", "dwp"],  # no --prior
        ["train", "--data", "d", "--out", "o", "--strategy", "prior"],  # no --prior
        ["train", "--data", "d", "--out", "o", "--strategy", "l2_sp"],  # no --source
        ["train", "--data", "d", "--out", "o", "--alpha", "0.1"],  # not random_init's
        ["train", "--data=d", "--out=o", "--strategy=l2_sp", "--source=s", "--alpha=-1"],
        ["train", "--data", "d", "--csv", "c", "--out", "o"],  # two sources
        ["train", "--data", "d"],  # no --out
        ["train", "--data", "d", "--out", "o", "--val-fraction", "1.5"],
        ["train", "--data", "d", "--out", "o", "--size", "16", "16"],
        ["train", "--data", "d", "--out", "o", "--beta-steps", "10"],  # no schedule
        ["train", "--data", "d", "--out", "o", "--n-classes", "3"],  # binarised: 2
        ["predict", "--checkpoint", "c", "--input", "i", "--out", "o", "--roi", "16", "16"],
        ["predict", "--checkpoint", "c", "--input", "i", "--out", "o", "--samples", "0"],
        ["fit"],
    ],
)
def test_bad_arguments_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "usage: unet3d" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# train --device


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("nonsense", "error: --device 'nonsense' is not a torch device ("),
        (f"cuda:{max(torch.cuda.device_count(), 7)}", "is not available on this machine"),
    ],
)
def test_train_device_errors_are_one_line_naming_the_option(
    tmp_path: Path, device: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # no such --data folder either: the device is checked first, before any data is read
    argv = _train_argv(tmp_path / "no-data", tmp_path / "out", "--device", device)
    status, _, err = _run(argv, capsys)
    assert status == cli.EXIT_ERROR
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --device '{device}'"), err
    assert message in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_train_device_reaches_the_config_and_a_resume_may_change_it(
    tmp_path: Path,
    data: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_train, seen = unet3d.train.train, []

    def spy(config, *args, **kwargs):
        seen.append(config.device)
        return real_train(config, *args, **kwargs)

    monkeypatch.setattr(unet3d.train, "train", spy)
    argv = _train_argv(data, tmp_path / "run")
    status, _, err = _run([*argv, "--device", "cpu"], capsys)
    assert status == 0, err
    # where a run computes is not part of it: neither config.json nor last.pt holds it
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    last = json.loads(torch.load(tmp_path / "run" / "last.pt", weights_only=True)["config"])
    assert "device" not in stored and "device" not in last
    status, _, err = _run([*argv, "--resume"], capsys)  # the default device this time
    assert status == 0, err
    assert seen == ["cpu", "cpu"]


def test_train_help_lists_the_device(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "--device DEVICE" in capsys.readouterr().out

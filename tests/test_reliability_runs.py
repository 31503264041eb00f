"""Run folders stay one consistent run (issue 20, items 1-3).

* ``--resume`` refuses other data, split or cases than the run's, naming what changed
  (:mod:`unet3d.fingerprint`); a run from before fingerprints still resumes, with a warning.
* The metrics files are rewritten from ``last.pt`` on resume, so a kill between the two
  writes loses no epoch.
* A new run refuses a folder holding another run's files unless ``--overwrite`` /
  ``overwrite=True`` replaces them, so an old ``best.pt`` never passes for the new run's.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from decathlon import write_decathlon

from unet3d import cli, run_files
from unet3d.cases import Case
from unet3d.fingerprint import data_changes, data_fingerprint, file_digest
from unet3d.run_files import RunFolderError
from unet3d.train import TrainConfig, train

WIDTHS = ["--widths", "2", "4", "4", "8"]


def _write_decathlon(root: Path, n_train: int = 4) -> Path:
    return write_decathlon(root, n_train, test_shape=None)


def _argv(data: Path, out: Path, *extra: str, epochs: int = 1, val: str = "0.25") -> list[str]:
    validation = ["--val-fraction", val] if val else []
    return [
        "train", "--data", str(data), *validation, *WIDTHS, "--size", "16",
        "--epochs", str(epochs), "--lr", "1e-2", "--batch-size", "1", "--out", str(out),
        "--no-progress", *extra,
    ]  # fmt: skip


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = cli.main(argv)
    return status, capsys.readouterr().err


def _rows(path: Path) -> list[dict]:
    """Metrics records without their timings (which differ between two runs)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(path.read_text())]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_decathlon(tmp_path_factory.mktemp("decathlon") / "data")


@pytest.fixture
def run(tmp_path: Path, data: Path) -> Path:
    """A finished one-epoch run (validated on a quarter of the cases)."""
    out = tmp_path / "run"
    assert cli.main(_argv(data, out)) == 0
    return out


# ---------------------------------------------------------------------------------------------
# 1. --resume refuses other data


def test_resume_refuses_another_val_fraction_and_keeps_config_json(
    run: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (run / "config.json").read_bytes()
    status, err = _run([*_argv(data, run, val="0.5"), "--resume"], capsys)
    assert status == cli.EXIT_ERROR and "Traceback" not in err
    assert "--val-fraction: 0.25 -> 0.5" in err and len(err.strip().splitlines()) == 1
    assert (run / "config.json").read_bytes() == before  # the run's record is not replaced


def test_resume_refuses_another_data_folder_naming_the_new_case(
    run: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = _write_decathlon(tmp_path / "other", n_train=5)
    status, err = _run([*_argv(other, run), "--resume"], capsys)
    assert status == cli.EXIT_ERROR
    assert f"--data: {data.resolve()} -> {other.resolve()}" in err and "added: case4" in err


def test_resume_refuses_a_changed_label_file(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    out = tmp_path / "run"
    assert cli.main(_argv(copy, out)) == 0
    label = copy / "labelsTr" / "case1.nii.gz"
    corrected = np.asarray(nib.load(label).dataobj).copy()
    corrected[4:8, 4:8, 4:8] = 1  # a corrected region: same shape, same size on disk or not
    nib.save(nib.Nifti1Image(corrected, np.eye(4)), label)
    status, err = _run([*_argv(copy, out), "--resume"], capsys)
    assert status == cli.EXIT_ERROR
    assert "case case1: label file changed" in err and "image" not in err.split("case1")[1]


def test_resume_of_a_run_without_fingerprint_warns_and_continues(
    run: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = json.loads((run / "config.json").read_text())
    del record["data"]  # as written before fingerprints existed
    (run / "config.json").write_text(json.dumps(record))
    status, err = _run([*_argv(data, run, epochs=2), "--resume"], capsys)
    # (epochs 1 -> 2 is another setting, refused as before; with the same settings:)
    assert status == cli.EXIT_ERROR and "epochs: 1 -> 2" in err
    status, err = _run([*_argv(data, run), "--resume"], capsys)
    assert status == 0, err
    assert "warning:" in err and "no data fingerprint" in err
    assert "data" in json.loads((run / "config.json").read_text())  # checked from now on


def test_fingerprint_follows_content_not_times_or_places(tmp_path: Path) -> None:
    small = tmp_path / "small.nii"
    small.write_bytes(bytes(range(256)) * 100)
    digest = file_digest(small)
    os.utime(small, ns=(0, 0))  # a copy or a restore changes times, not data
    shutil.copy(small, tmp_path / "copy.nii")
    assert file_digest(small) == digest == file_digest(tmp_path / "copy.nii")
    # a large uncompressed volume: an edited region in the middle is seen by the sampling
    big = tmp_path / "big.nii"
    content = bytearray(np.random.default_rng(0).bytes(8 << 20))
    big.write_bytes(content)
    digest = file_digest(big)
    content[4 << 20 : (4 << 20) + (128 << 10)] = bytes(128 << 10)
    big.write_bytes(content)
    assert file_digest(big)["size"] == digest["size"] and file_digest(big) != digest


def test_data_changes_name_each_difference(tmp_path: Path) -> None:
    files = []
    for i in range(6):
        files.append(tmp_path / f"c{i}.nii")
        files[-1].write_bytes(bytes([i]) * 10)
    cases = [Case(f"c{i}", f) for i, f in enumerate(files)]
    old = data_fingerprint({"--data": "/a", "--val-fraction": 0.2}, cases[:5], None)
    new = data_fingerprint({"--data": "/a", "--val-fraction": 0.2}, cases[1:], cases[:1])
    assert data_changes(old, old) == []
    assert data_changes(old, new) == [
        "training cases added: c5",
        "training cases removed: c0",
        "validation cases: none -> 1 cases",
    ]
    files[2].write_bytes(b"edited")
    edited = data_fingerprint({"--data": "/b", "--val-fraction": 0.2}, cases[:5], None)
    assert data_changes(old, edited) == ["--data: /a -> /b", "case c2: image file changed"]
    fewer = data_fingerprint({"--data": "/a", "--val-fraction": 0.2}, cases[5:], None)
    assert "training cases removed: c0, c1, c2 and 2 more" in data_changes(old, fewer)


# ---------------------------------------------------------------------------------------------
# 2. metrics and last.pt are one state


def test_metrics_lost_to_a_kill_are_rewritten_by_resume(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.main(_argv(data, tmp_path / "full", epochs=2)) == 0
    real = run_files.write_metrics

    def killed_at_the_last_epoch(history: list, out_dir: Path) -> None:
        if len(history) == 2:  # after last.pt of epoch 1 is written, as a kill would
            raise OSError("killed before the metrics were written")
        real(history, out_dir)

    cut = tmp_path / "cut"
    monkeypatch.setattr(run_files, "write_metrics", killed_at_the_last_epoch)
    status, err = _run(_argv(data, cut, epochs=2), capsys)
    assert status == cli.EXIT_ERROR and "killed" in err
    monkeypatch.undo()
    assert torch.load(cut / "last.pt", weights_only=True)["epoch"] == 2  # finished...
    assert len(json.loads((cut / "metrics.json").read_text())) == 1  # ...the metrics not
    status, err = _run([*_argv(data, cut, epochs=2), "--resume"], capsys)
    assert status == 0, err
    assert _rows(cut / "metrics.json") == _rows(tmp_path / "full" / "metrics.json")
    assert [r["epoch"] for r in csv.DictReader((cut / "metrics.csv").open())] == ["0", "1"]


class Killed(Exception):
    """Raised instead of the metrics write, as a kill right after ``last.pt``."""


def _config(out: Path, **overrides) -> TrainConfig:
    options = dict(out_dir=out, epochs=2, lr=1e-2, widths=(2, 4, 4, 8), progress=False)
    return TrainConfig(**{**options, **overrides})


class _Volumes(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 1, 16, 16, 16, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": (self.images[i, 0] > 0.5).long()}


@pytest.fixture(scope="module")
def volumes() -> tuple[_Volumes, _Volumes]:
    return _Volumes(4, 0), _Volumes(2, 1)


def test_train_rewrites_metrics_from_last_pt_on_resume(
    tmp_path: Path, volumes: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = train(_config(tmp_path / "full"), *volumes)
    real = run_files.write_metrics

    def killed(history: list, out_dir: Path) -> None:
        if len(history) == 2:
            raise Killed
        real(history, out_dir)

    monkeypatch.setattr(run_files, "write_metrics", killed)
    with pytest.raises(Killed):
        train(_config(tmp_path / "cut"), *volumes)
    monkeypatch.undo()
    resumed = train(_config(tmp_path / "cut"), *volumes, resume=True)  # finished: no epoch
    assert len(resumed.history) == 2
    assert _rows(tmp_path / "cut" / "metrics.json") == [
        {k: v for k, v in r.items() if k != "seconds"} for r in full.history
    ]


# ---------------------------------------------------------------------------------------------
# 3. a new run never starts among another run's files


def test_a_new_run_into_a_used_out_is_refused(
    run: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    best = (run / "best.pt").read_bytes()
    status, err = _run(_argv(data, run), capsys)
    assert status == cli.EXIT_ERROR
    assert "previous run" in err and "--resume" in err and "--overwrite" in err
    assert (run / "best.pt").read_bytes() == best


def test_overwrite_replaces_the_previous_run_best_pt_included(
    run: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run / "source_restart0.pt").write_bytes(b"old")  # as if the old run had restarts
    (run / "notes.txt").write_text("mine")  # not a run's file: kept
    # without validation the new run never writes a best.pt: the old one must not remain
    status, err = _run([*_argv(data, run, val=""), "--overwrite"], capsys)
    assert status == 0, err
    names = {p.name for p in run.iterdir()}
    assert {"last.pt", "metrics.json", "metrics.csv", "config.json", "notes.txt"} <= names
    assert "best.pt" not in names and "source_restart0.pt" not in names
    assert json.loads((run / "config.json").read_text())["val_cases"] is None
    with pytest.raises(SystemExit):  # continuing and replacing exclude each other
        cli.main([*_argv(data, run), "--overwrite", "--resume"])


def test_resume_without_last_pt_keeps_best_pt(
    run: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run / "last.pt").unlink()
    status, err = _run([*_argv(data, run), "--resume"], capsys)
    assert status == cli.EXIT_ERROR and "no last.pt" in err and "--overwrite" in err
    assert (run / "best.pt").is_file()


def test_train_refuses_or_replaces_a_previous_run(tmp_path: Path, volumes: tuple) -> None:
    out = tmp_path / "run"
    train(_config(out, epochs=1), *volumes)
    with pytest.raises(RunFolderError, match=r"best\.pt.*overwrite=True"):
        train(_config(out, epochs=1), *volumes)
    with pytest.raises(ValueError, match="exclude"):
        train(_config(out, epochs=1), *volumes, resume=True, overwrite=True)
    # overwrite=True without validation: no best.pt of the previous run survives
    result = train(_config(out, epochs=1), volumes[0], overwrite=True)
    assert result.best_epoch == -1 and not (out / "best.pt").exists()


def test_train_resume_without_last_pt_starts_clean(tmp_path: Path, volumes: tuple) -> None:
    """The benchmarks resume cells with ``resume=True`` and delete ``last.pt`` once a cell
    is scored: a cell cut in between starts over, without the old ``best.pt``."""
    out = tmp_path / "cell"
    train(_config(out, epochs=1), *volumes)
    (out / "last.pt").unlink()
    result = train(_config(out, epochs=1), volumes[0], resume=True)
    assert len(result.history) == 1 and not (out / "best.pt").exists()


# ---------------------------------------------------------------------------------------------
# Checks that come before the work (issue 20, items 5 and 6)


def test_a_damaged_validation_file_fails_before_any_training_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_decathlon(tmp_path / "data")
    val = _write_decathlon(tmp_path / "val", n_train=2)
    (val / "labelsTr" / "case1.nii.gz").write_bytes(b"not a NIfTI file")
    out = tmp_path / "run"
    argv = [a for a in _argv(data, out, val="") if True] + ["--val-data", str(val)]
    status, err = _run(argv, capsys)
    assert status == 2
    assert "case1.nii.gz" in err and err.count("\n") == 1
    assert not (out / "last.pt").exists()  # no epoch was trained


def test_batching_3d_with_4d_images_names_the_channels_not_the_size() -> None:
    from unet3d.data import DataError, collate

    items = [
        {"id": "a", "image": torch.zeros(1, 4, 4, 4), "label": torch.zeros(4, 4, 4)},
        {"id": "b", "image": torch.zeros(2, 4, 4, 4), "label": torch.zeros(4, 4, 4)},
    ]
    with pytest.raises(DataError, match=r"\[1, 2\] channels.*modality") as caught:
        collate(items)
    assert "size=" not in str(caught.value)


def test_a_diverging_run_stops_before_its_step_with_the_weights_intact(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """unet3d.train checks each minibatch's data term with dwp.LossGuard before backward:
    a loss that blows up (here: made to, at the third step) stops the run, and the weights
    are those the step was computed from."""
    import dwp
    from unet3d.cases import load_decathlon
    from unet3d.data import SegmentationDataset
    from unet3d.strategies import get_strategy

    kind = type(get_strategy("random_init"))
    original = kind.loss
    seen: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = []

    def exploding(self, model, logits, target, n_data, batch_size, step):
        loss, terms = original(self, model, logits, target, n_data, batch_size, step)
        seen.append((model, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        if len(seen) == 3:
            loss = loss * 1e9
            terms = {**terms, "loss": float(loss.detach())}
        return loss, terms

    monkeypatch.setattr(kind, "loss", exploding)
    cases = load_decathlon(data, "train")
    config = TrainConfig(strategy="random_init", epochs=2, lr=1e-2, batch_size=1,
                         widths=(2, 4, 4, 8), size=(16, 16, 16), progress=False)  # fmt: skip
    with pytest.raises(dwp.DivergedLossError, match="step 2"):
        train(config, SegmentationDataset(cases, size=(16, 16, 16)))
    assert len(seen) == 3
    model, before = seen[-1]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)

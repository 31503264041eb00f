"""The optimiser-path benchmark's pipeline on the ci preset (tiny volumes: the numbers mean
nothing, the shape of the results does)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import variational
from benchmarks.variational.pipeline import jobs_of

pytest.importorskip("nilearn")  # the cohorts' anatomy


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("variational")
    argv = ["--preset", "ci", "--seed", "0", "--out", str(root / "out"),
            "--work-dir", str(root / "work"), "--jobs", "1", "--no-progress"]  # fmt: skip
    assert variational.main(argv) == 0
    payload = json.loads((root / "out" / "variational_ci.json").read_text())
    return SimpleNamespace(root=root, argv=argv, payload=payload)


def test_every_run_and_path_is_reported(ci_run: SimpleNamespace) -> None:
    preset = variational.PRESETS["ci"]
    records = [r for r in ci_run.payload["rows"] if "timing" not in r]
    expected = {(j.method, j.path, j.split) for j in jobs_of(preset)}
    assert {(r["method"], r["path"], r["split"]) for r in records} == expected
    # IVON's prior is Gaussian: it runs for the N(0, 1) control only
    assert ("dwp", "ivon", 0) not in expected and ("normal_prior", "ivon", 0) in expected
    for r in records:
        assert 0 <= r["dice"] <= 1 and r["steps"] >= 1
        if r["method"] != "pretrained":
            assert r["neg_elbo"] > 0 and r["kl"] > 0 and r["log_sigma_change"] >= 0
    markdown = (ci_run.root / "out" / "variational_ci.md").read_text()
    for heading in ("What each optimiser path learned", "without a learned posterior", "Cost"):
        assert heading in markdown


def test_the_natural_path_moves_the_scales_and_adam_does_not(ci_run: SimpleNamespace) -> None:
    rows = {(r["method"], r["path"]): r for r in ci_run.payload["config"]["summary"]}
    for method in ("normal_prior", "dwp"):
        natural = rows[method, "natural"]["log_sigma_change"]
        assert natural > 0.1 > rows[method, "adam_tenth"]["log_sigma_change"]


def test_step_times_are_ratios_to_plain_adam(ci_run: SimpleNamespace) -> None:
    timing = [r for r in ci_run.payload["rows"] if r.get("timing")]
    assert {r["path"] for r in timing} == set(variational.PRESETS["ci"].paths)
    assert all(r["baseline"] == "adam" and r["ratio"] > 0 for r in timing)
    assert next(r for r in timing if r["path"] == "adam")["ratio"] == 1.0


def test_a_rerun_reads_every_run_back(ci_run: SimpleNamespace, monkeypatch) -> None:
    from benchmarks.variational import runs

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runs, "train", no_training)
    argv = [*ci_run.argv, "--out", str(ci_run.root / "again")]
    assert variational.main(argv) == 0
    again = json.loads((Path(ci_run.root) / "again" / "variational_ci.json").read_text())
    first = [r for r in ci_run.payload["rows"] if "timing" not in r]
    assert [r for r in again["rows"] if "timing" not in r] == first


def test_a_runs_key_holds_no_device_and_mixed_precision_only_when_on() -> None:
    from benchmarks.variational.config import PRESETS
    from benchmarks.variational.pipeline import transfer_preset
    from benchmarks.variational.runs import Run

    preset = PRESETS["quick"]
    transfer = transfer_preset(preset)
    run = Run("dwp", "natural", 0)
    key = run.key(preset, transfer, {})
    assert not {"device", "amp"} & key["transfer"].keys()  # the float32 keys of before
    assert run.key(preset, transfer.replace(device="cpu"), {}) == key
    assert run.key(preset, transfer.replace(amp="bf16"), {})["transfer"]["amp"] == "bf16"

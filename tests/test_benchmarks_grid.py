"""The grid on an engine (:mod:`benchmarks.grid`): the transfer benchmark's cells as
submitit jobs give the serial run's report, a rerun submits nothing, a failed job is named
with its log while the other jobs finish, and the options reach the SLURM script.

The jobs run through submitit's local executor (processes on this machine), on a grid
small enough that process start-up dominates: the ``ci`` preset with the N(0, 1) control
alone, one split, so that both waves run (two tuning candidates of its KL weight at n=2,
then the grid's n=3 cell once the weight is chosen) and no source or prior stage is needed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from summaries import flat, summary_results

from benchmarks import grid, transfer

pytest.importorskip("nilearn")  # the cohorts' anatomy
pytest.importorskip("submitit")

GRID = ["--preset", "ci", "--seed", "0", "--set", "methods=normal_prior", "--set", "splits=1"]
GRID += ["--set", "normal_init=fresh", "--regimes", "near"]  # no source stage, one target
#: two jobs of one thread each: the thread count of the serial run they are compared with
ENGINE = ["--engine", "submitit", "--jobs", "2", "--threads", "2", "--no-progress"]


def _main(work: Path, out: Path, *extra: str) -> int:
    return transfer.main([*GRID, "--work-dir", str(work), "--out", str(out), *extra])


def _copy_stages(work: Path, to: Path) -> Path:
    """A copy of ``work`` without its runs: the cached data stage, no finished cell."""
    shutil.copytree(work, to, ignore=shutil.ignore_patterns("runs", "submitit"))
    return to


def _results(work: Path) -> dict[Path, Path]:
    """Every finished run's file by its folder under work: a scored cell's ``result.json``,
    or the ``training.json`` of a tuning candidate that was only trained and validated."""
    found = {p.parent.relative_to(work): p for p in work.glob("runs/*/n*/split*/training.json")}
    found.update({p.parent.relative_to(work): p for p in work.glob("runs/*/n*/split*/result.json")})
    return found


def _jobs(work: Path) -> set[str]:
    """The job folders submitit made (``%j`` is its template folder, made at start)."""
    return {p.name for p in (work / "submitit").iterdir() if p.name != "%j"}


@pytest.fixture(scope="module")
def serial(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("grid")
    work, out = root / "serial", root / "serial_out"
    assert _main(work, out, "--jobs", "1", "--threads", "1", "--no-progress") == 0
    payload = json.loads((out / "transfer_ci.json").read_text())
    return SimpleNamespace(root=root, work=work, payload=payload)


@pytest.fixture(scope="module")
def submitted(serial: SimpleNamespace) -> SimpleNamespace:
    work = _copy_stages(serial.work, serial.root / "submitit")
    out = serial.root / "submitit_out"
    assert _main(work, out, *ENGINE) == 0
    payload = json.loads((out / "transfer_ci.json").read_text())
    return SimpleNamespace(work=work, out=out, payload=payload)


def test_local_executor_gives_the_serial_report(
    serial: SimpleNamespace, submitted: SimpleNamespace
) -> None:
    rows, twins = serial.payload["rows"], submitted.payload["rows"]
    assert len(rows) == 2 and len(_results(submitted.work)) == 3  # n=2 twice, then n=3
    for row, twin in zip(rows, twins, strict=True):
        assert (twin["method"], twin["size"], twin["split"]) == (
            row["method"],
            row["size"],
            row["split"],
        )
        assert twin["train_ids"] == row["train_ids"]
        assert twin["test"]["dice"] == pytest.approx(row["test"]["dice"], abs=1e-6)
        assert flat(twin["uncertainty"]) == pytest.approx(flat(row["uncertainty"]), abs=1e-6)
    serial_config = serial.payload["config"]["regimes"]["near"]
    config = submitted.payload["config"]["regimes"]["near"]
    assert flat(config["selections"]) == pytest.approx(flat(serial_config["selections"]))
    # training times are measurements, not results: every other number must agree
    assert summary_results(config["summary"]) == pytest.approx(
        summary_results(serial_config["summary"]), nan_ok=True
    )
    assert config["execution"]["engine"] == "submitit/local"
    assert config["execution"]["threads_per_run"] == 1
    # one job per run: the two candidates, the chosen one's scoring on the test set (its
    # training is done), the n=3 cell; what travels is paths and settings, not tensors
    pickles = list((submitted.work / "submitit").glob("*/*_submitted.pkl"))
    assert len(pickles) == 4
    assert max(p.stat().st_size for p in pickles) < 64_000


def test_rerun_with_everything_finished_submits_no_job(submitted: SimpleNamespace) -> None:
    jobs = _jobs(submitted.work)
    stamps = {k: p.stat().st_mtime_ns for k, p in _results(submitted.work).items()}
    assert _main(submitted.work, submitted.out, *ENGINE) == 0
    assert _jobs(submitted.work) == jobs
    assert {k: p.stat().st_mtime_ns for k, p in _results(submitted.work).items()} == stamps


def test_a_failed_job_is_named_with_its_log_and_the_others_finish(
    serial: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    work = _copy_stages(serial.work, serial.root / "failing")
    # the tuning runs of the two KL weights (the grid's n=2 cell is one of them)
    broken, fine = sorted(k for k in _results(serial.work) if k.parts[-2] == "n2")
    # a file where the cell's folder goes: its training cannot start
    (work / broken).parent.mkdir(parents=True)
    (work / broken).touch()
    capsys.readouterr()
    assert _main(work, serial.root / "failing_out", *ENGINE) == 1
    error = capsys.readouterr().err
    assert f"normal_prior n=2 split=0 ({work / broken})" in error
    assert "1 of 2 runs failed" in error and "FileExistsError" in error
    (line,) = [line for line in error.splitlines() if line.startswith("  normal_prior")]
    log = Path(line.rsplit("(log: ", 1)[1].removesuffix(")"))
    assert log.is_relative_to(work / "submitit") and "FileExistsError" in log.read_text()
    # the other candidate trained to the end, with the serial run's numbers (validation
    # only: no setting was chosen, so no candidate was scored on the test set)
    done = json.loads((work / fine / "training.json").read_text())
    twin = json.loads(_results(serial.work)[fine].read_text())
    assert not (work / fine / "result.json").exists()
    assert done["val_dice"] == pytest.approx(twin["val_dice"], abs=1e-6)
    # no grid cell of a method whose settings could not be chosen
    assert set(_results(work)) == {fine}


def test_missing_submitit_is_one_line_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "submitit", None)  # how an absent module looks
    assert _main(tmp_path / "work", tmp_path / "out", "--engine", "submitit") == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and 'pip install "dwp[grid]"' in error
    assert not (tmp_path / "work").exists()  # failed before any work


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cluster", "slurm"], "need --engine submitit"),
        (["--slurm-gpus", "1"], "need --engine submitit"),
        (["--engine", "submitit", "--executor-option", "slurm_qos"], "NAME=VALUE"),
        (["--engine", "submitit", "--executor-option", "slurm_colour=red"], "colour"),
    ],
)
def test_bad_engine_options_exit_2_with_a_message(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _main(tmp_path / "work", tmp_path / "out", *argv) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1


def _engine(argv: list[str]) -> grid.Engine:
    parser = argparse.ArgumentParser()
    grid.add_engine_arguments(parser)
    return grid.engine_from_args(parser.parse_args(argv))


def test_slurm_options_reach_the_sbatch_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # submitit's SLURM executor only checks that srun exists; nothing is submitted here
    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}{os.pathsep}{os.environ['PATH']}")
    engine = _engine(
        ["--engine", "submitit", "--cluster", "slurm", "--slurm-partition", "gpu",
         "--slurm-gpus", "1", "--slurm-cpus", "4", "--slurm-time", "720",
         "--executor-option", "slurm_account=abc"]
    )  # fmt: skip
    assert engine.remote and engine.threads_per_run(threads=16, jobs=2) == 4
    submitter = engine.start(tmp_path / "submitit", "dwp-transfer")
    # the script submitit would hand sbatch (a private method: no public way without SLURM)
    script = submitter.executor._executor._make_submission_file_text("command", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=4", "--time=720",
                 "--account=abc", "--job-name=dwp-transfer"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script
    default = _engine(["--engine", "submitit", "--cluster", "slurm"])
    assert default.parameters["slurm_timeout_min"] == grid.DEFAULT_SLURM_MINUTES  # not 5 min
    assert _engine([]) == grid.Engine() and not grid.Engine().submitit


def test_map_reports_each_failure_by_name_and_call_returns_the_result(tmp_path: Path) -> None:
    """The generic engine, on builtins (a job imports its function by name)."""
    submitter = grid.Engine("submitit").start(tmp_path, "test")
    seen = []
    names = ["four", "minus one", "nine"]
    done = lambda i, failure: seen.append((i, failure and failure.name))  # noqa: E731
    failures = submitter.map(math.sqrt, [4.0, -1.0, 9.0], names, at_once=3, done=done)
    assert sorted(seen) == [(0, None), (1, "minus one"), (2, None)]
    (failure,) = failures
    assert failure.name == "minus one" and failure.error == "ValueError: math domain error"
    assert failure.log is not None and "math domain error" in failure.log.read_text()
    assert submitter.call(math.hypot, 3.0, 4.0, name="hypot") == 5.0

"""The regression benchmark's pipeline runs end to end and writes its files (``ci`` preset);
each run keeps one result file under ``--work-dir``, so a rerun trains nothing; submitit's
local executor gives the serial run's report; a failed job is named with its log while
the other runs finish.

Numbers are not asserted: two training steps per network measure nothing.  They are
compared: every run seeds itself, so the same run with the same torch thread count gives
the same numbers in this process, in a worker process or in a submitit job.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from processes import assert_sigterm_ends_the_workers

from benchmarks import regression

#: one torch thread: the thread count of each of the two submitit jobs run at a time
SERIAL = ["--preset", "ci", "--seed", "1", "--threads", "1"]
ENGINE = ["--engine", "submitit", "--jobs", "2", "--threads", "2"]


def _main(out: Path, work: Path, *extra: str) -> int:
    return regression.main([*SERIAL, "--out", str(out), "--work-dir", str(work), *extra])


def _payload(out: Path) -> dict:
    return json.loads((out / "regression_ci.json").read_text())


def _results(work: Path) -> dict[str, int]:
    """Every run's result files (``.json`` and ``.pt``), by name, with their mtimes."""
    return {
        p.name: p.stat().st_mtime_ns
        for p in work.glob("regression-*/*.*")
        if p.name != "config.json"
    }


def _jobs(work: Path) -> set[str]:
    """The job folders submitit made (``%j`` is its template folder, made at start)."""
    return {p.name for p in (work / "submitit").iterdir() if p.name != "%j"}


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("regression")
    out, work = root / "out", root / "work"
    assert _main(out, work) == 0
    return SimpleNamespace(root=root, out=out, work=work, payload=_payload(out))


def test_ci_preset_writes_tables_json_and_figures(ci_run) -> None:
    names = sorted(p.name for p in ci_run.out.iterdir())
    assert names == [
        "regression_ci.json",
        "regression_ci.md",
        "regression_ci_hydranet.png",
        "regression_ci_importance.png",
        "regression_ci_local_maps.png",
    ]
    for png in ci_run.out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (ci_run.out / "regression_ci.md").read_text()
    for heading in ("## (a) BagNet", "## (b) Hydranet", "## (c) Importance"):
        assert heading in markdown
    assert "python -m benchmarks.regression --preset ci --seed 1" in markdown


def test_json_rows_cover_every_section_and_method(ci_run) -> None:
    result = ci_run.payload
    rows = result["rows"]
    bag = [r for r in rows if r["section"] == "bagnet"]
    assert [r["receptive_field"] for r in bag] == [9, 17, 33, 177]
    assert all(r["measured_receptive_field"] == r["receptive_field"] for r in bag)
    hydra = {(r["method"], r["target"]) for r in rows if r["section"] == "hydranet"}
    assert hydra == {(m, t) for m in regression.METHODS for t in ("count", "volume_mm3")}
    importance = [r for r in rows if r["section"] == "importance"]
    assert len(importance) == 1 + len(regression.RECEPTIVE_FIELDS)
    assert all(0.0 <= r["auc_population"] <= 1.0 for r in importance)
    assert result["config"]["preset"] == "ci" and result["config"]["seed"] == 1
    assert result["config"]["execution"]["engine"] == "processes"


def test_every_run_has_one_result_file(ci_run) -> None:
    runs = {name.rsplit(".", 1)[0] for name in _results(ci_run.work)}
    hydra = {f"hydranet_n12_seed1_{method}" for method in regression.METHODS}
    bagnets = {f"bagnet_rf{rf}" for rf in regression.RECEPTIVE_FIELDS}
    best = min(ci_run.payload["rows"][:4], key=lambda r: r["age_mae"])["receptive_field"]
    assert runs == bagnets | hydra | {"prior", f"importance_bagnet{best}"}


def test_rerun_reads_every_run_back(ci_run) -> None:
    stamps = _results(ci_run.work)
    out = ci_run.root / "rerun"
    assert _main(out, ci_run.work) == 0
    assert _results(ci_run.work) == stamps
    payload = _payload(out)
    assert payload["config"]["execution"]["runs_done_now"] == 0
    assert payload["rows"] == ci_run.payload["rows"]  # seconds included: read back


def test_a_rerun_keeps_the_hand_measured_ablation_section(ci_run) -> None:
    from benchmarks.regression.report import ABLATIONS_HEADING, mean_ci

    out = ci_run.root / "ablations"
    out.mkdir()
    section = f"{ABLATIONS_HEADING}\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    old = (ci_run.out / "regression_ci.md").read_text()
    (out / "regression_ci.md").write_text(old.replace("Produced by:", section + "\nProduced by:"))
    for _ in range(2):  # kept once, before the footer, however often the report is redrawn
        assert _main(out, ci_run.work) == 0
        markdown = (out / "regression_ci.md").read_text()
        assert markdown.count(ABLATIONS_HEADING) == 1 and section.strip() in markdown
        assert markdown.index(ABLATIONS_HEADING) < markdown.index("Produced by:")
        assert markdown.count("Produced by:") == 1
    mean, low, high = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(mean - low)
    assert high - mean == pytest.approx(4.3027 / 3**0.5, rel=1e-4)  # t(0.975, 2) * sem
    assert mean_ci([5.0]) == (5.0, 5.0, 5.0)


def test_ablations_run_beside_the_others_and_replace_section_d(ci_run) -> None:
    from benchmarks.regression.ablations import ABLATIONS
    from benchmarks.regression.report import ABLATIONS_HEADING

    out = ci_run.root / "with_ablations"
    before = _results(ci_run.work)
    assert _main(out, ci_run.work, "--ablations") == 0
    after = _results(ci_run.work)
    # (a)-(c) read back; one new result file per ablation (ci: one repetition, 12 subjects)
    assert {k: v for k, v in after.items() if k in before} == before
    new = {name.rsplit(".", 1)[0] for name in after.keys() - before.keys()}
    assert new == {f"ablation_{a.slug}_n12_seed1" for a in ABLATIONS}
    payload = _payload(out)
    rows = [r for r in payload["rows"] if r.get("section") == "ablation"]
    assert {(r["ablation"], r["target"]) for r in rows} == {
        (a.name, t) for a in ABLATIONS for t in ("count", "volume_mm3")
    }
    markdown = (out / "regression_ci.md").read_text()
    assert markdown.count(ABLATIONS_HEADING) == 1
    section = markdown[markdown.index(ABLATIONS_HEADING) :]
    for a in ABLATIONS:
        assert f"| {a.name} |" in section
    assert "| (b) base |" in section and "| (b) Hydranet |" in section
    # a rerun without --ablations keeps the measured section
    assert _main(out, ci_run.work) == 0
    assert (out / "regression_ci.md").read_text().count(ABLATIONS_HEADING) == 1


def test_ablations_change_only_what_they_name(ci_run) -> None:
    from benchmarks.regression.ablations import ABLATIONS, AblationRun
    from benchmarks.regression.config import PRESETS
    from benchmarks.regression.hydranet import HydraRun

    preset = PRESETS["quick"]
    common = {"folder": ci_run.work, "preset": preset, "seed": 0, "n_train": 12, "rep": 1}
    by_name = {a.name: a for a in ABLATIONS}
    base = HydraRun(**common, method="hydranet").train_config(1)
    one = AblationRun(**common, method="hydranet", ablation=by_name["one set per step"])
    assert one.train_config(1) == replace(base, hydranet=replace(base.hydranet, sets_per_step=1))
    centred = AblationRun(**common, method="hydranet", ablation=by_name["centred sums"])
    config = centred.train_config(1)
    assert config.hydranet.centre and config.steps == preset.regressor_steps
    paper = by_name["base, Adadelta + augmentation"]
    run = AblationRun(**common, method=paper.method, ablation=paper)
    assert run.train_config(1).optimizer == "adadelta" and run.train_config(1).hydranet is None
    assert run.augmentation(1) is not None and one.augmentation(1) is None


def test_named_ablations_run_alone_and_keep_the_other_rows(ci_run, capsys) -> None:
    from benchmarks.regression.report import mean_ci_text

    out = ci_run.root / "named_ablations"
    out.mkdir()
    previous = _payload(ci_run.out)
    kept = {**previous["rows"][0], "section": "ablation", "ablation": "sets of 2"}
    kept.update(target="count", n_train=12, seed=1, icc=0.123, train_icc=0.5, seconds=1.0)
    stale = {**kept, "ablation": "Hydranet, lr 3e-4", "icc": 0.987}  # rerun now: replaced
    previous["rows"] += [kept, stale]
    (out / "regression_ci.json").write_text(json.dumps(previous))
    assert _main(out, ci_run.work, "--ablations", "hydranet_lr_3e_4") == 0
    rows = [r for r in _payload(out)["rows"] if r.get("section") == "ablation"]
    assert {(r["ablation"], r["target"]) for r in rows} == {
        ("sets of 2", "count"),
        ("Hydranet, lr 3e-4", "count"),
        ("Hydranet, lr 3e-4", "volume_mm3"),
    }
    assert 0.987 not in [r["icc"] for r in rows]
    section = (out / "regression_ci.md").read_text().split("## (d)")[1]
    # one seed: the value without an interval
    assert f"| sets of 2 | set size 2 (pairs) | 1 | {mean_ci_text([0.123])} |" in section
    assert mean_ci_text([0.123]) == "0.12"
    assert section.index("sets of 2") < section.index("Hydranet, lr 3e-4")  # ABLATIONS' order

    assert _main(out, ci_run.work, "--ablations", "no_such_variant") == 2
    assert "--ablations: unknown no_such_variant; choose from" in capsys.readouterr().err


def test_device_is_checked_first_and_is_no_part_of_a_run(ci_run, capsys) -> None:
    from benchmarks.regression.hydranet import HydraRun

    out = ci_run.root / "device"
    assert _main(out, ci_run.work / "none", "--device", "gpu") == 2
    assert capsys.readouterr().err.startswith("error: --device 'gpu' is not a torch device")
    assert not (ci_run.work / "none").exists() and not out.exists()
    run = HydraRun(folder=ci_run.work, preset=regression.PRESETS["ci"], seed=1, n_train=12,
                   rep=0, method="hydranet", device="cpu")  # fmt: skip
    assert run.train_config(1).device == "cpu" and "device" not in run.stem()
    # a rerun on a named device reads every finished run back
    stamps = _results(ci_run.work)
    assert _main(ci_run.root / "device_cpu", ci_run.work, "--device", "cpu") == 0
    assert _results(ci_run.work) == stamps


@pytest.mark.parametrize(
    ("amp", "message"),
    [
        ("fp16", "error: --amp fp16 needs a CUDA device (device cpu); use --amp bf16"),
        ("half", "error: --amp must be one of off, bf16, fp16, got 'half'"),
    ],
)
def test_a_bad_precision_is_one_line_before_anything_is_written(
    tmp_path, capsys, amp, message
) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    assert _main(out, work, "--amp", amp) == 2
    assert capsys.readouterr().err == message + "\n"
    assert not out.exists() and not work.exists()


def test_mixed_precision_keys_its_own_runs_and_float32_keeps_its_key(tmp_path) -> None:
    from benchmarks.regression.hydranet import HydraRun
    from benchmarks.regression.runs import VERSION, work_folder
    from benchmarks.stages import stage_folder

    preset = regression.PRESETS["ci"]
    # the key from before --amp: float32 runs of then are read back
    before = {"benchmark": "regression", "version": VERSION, "seed": 1, **asdict(preset)}
    float32 = work_folder(tmp_path, preset, 1)
    assert float32 == work_folder(tmp_path, preset, 1, "off")
    assert float32 == stage_folder(tmp_path, "regression", before, create=False)
    bf16 = work_folder(tmp_path, preset, 1, "bf16")
    assert bf16 != float32 and json.loads((bf16 / "config.json").read_text())["amp"] == "bf16"
    assert work_folder(tmp_path, preset, 1, "fp16") not in (bf16, float32)
    # in the folder's key, not in the run's name; the device in neither
    run = HydraRun(folder=bf16, preset=preset, seed=1, n_train=12, rep=0, method="hydranet")
    mixed = replace(run, amp="bf16", device="cpu")
    assert mixed.stem() == run.stem() and mixed.train_config(1).amp == "bf16"
    assert run.train_config(1).amp == "off"


def test_a_bagnet_run_trains_in_mixed_precision_on_the_device(tmp_path, monkeypatch) -> None:
    import regression3d as r3d
    from benchmarks.regression.bagnets import BagnetRun

    fit, configs = r3d.fit, []

    def spy(*args, **kwargs):
        configs.append(args[3])
        return fit(*args, **kwargs)

    monkeypatch.setattr(r3d, "fit", spy)
    preset = regression.PRESETS["ci"]
    run = BagnetRun(folder=tmp_path, preset=preset, seed=1, rf=9, device="cpu", amp="bf16")
    run.compute()
    assert [(c.amp, c.device) for c in configs] == [("bf16", "cpu")] * 2  # age and sex
    assert run.finished() and run.record()["row"]["receptive_field"] == 9


def test_the_2_mm_ablation_sees_the_same_subjects_on_a_finer_grid(ci_run) -> None:
    from benchmarks.regression.ablations import ABLATIONS, AblationRun, ablation_runs
    from benchmarks.regression.cohort import scale_crop
    from benchmarks.regression.config import LESION_CROP, PRESETS

    preset = PRESETS["ci"]
    fine = next(a for a in ABLATIONS if a.resolution == 2 and a.method == "base")
    run = AblationRun(
        folder=ci_run.work, preset=preset, seed=1, n_train=12, rep=0, method="base",
        ablation=fine,
    )  # fmt: skip
    (pool, test), (pool4, test4) = run.cohorts(), regression.lesion_cohorts(preset, 1)
    assert pool.x.shape[2:] == tuple(2 * n for n in pool4.x.shape[2:])
    assert (pool.targets["count"] == pool4.targets["count"]).all()
    assert (test.targets["count"] == test4.targets["count"]).all()
    assert scale_crop(LESION_CROP, 2)[0] == slice(16, 80)
    with pytest.raises(ValueError, match="resolution must divide 4 mm"):
        scale_crop(LESION_CROP, 3)
    # the costliest first: 8x the voxels, and Hydranet's sets 4x a base run
    quick = ablation_runs(PRESETS["quick"], 0, ci_run.work)
    assert max(quick, key=lambda r: r.cost()).ablation.name == "Hydranet at 2 mm"
    assert sum(r.ablation.resolution == 2 for r in quick) == 2  # one seed each


@pytest.fixture(scope="module")
def submitted(ci_run) -> SimpleNamespace:
    pytest.importorskip("submitit")
    out, work = ci_run.root / "submitit_out", ci_run.root / "submitit"
    assert _main(out, work, *ENGINE) == 0
    return SimpleNamespace(out=out, work=work, payload=_payload(out))


def test_local_executor_gives_the_serial_report(ci_run, submitted) -> None:
    rows = _without_seconds(submitted.payload["rows"])
    assert rows == _without_seconds(ci_run.payload["rows"])
    config, serial = submitted.payload["config"], ci_run.payload["config"]
    assert config["dwp_prior"] == serial["dwp_prior"]
    assert config["execution"]["engine"] == "submitit/local"
    assert config["execution"]["threads_per_run"] == 1
    # one job per run; what travels is paths and settings, not tensors
    pickles = list((submitted.work / "submitit").glob("*/*_submitted.pkl"))
    assert len(pickles) == config["execution"]["runs_done_now"] == 10
    assert max(p.stat().st_size for p in pickles) < 16_000


def test_rerun_with_everything_finished_submits_no_job(submitted) -> None:
    jobs, stamps = _jobs(submitted.work), _results(submitted.work)
    assert _main(submitted.out, submitted.work, *ENGINE) == 0
    assert _jobs(submitted.work) == jobs
    assert _results(submitted.work) == stamps


def test_a_failed_job_is_named_with_its_log_and_the_others_finish(
    submitted, capsys: pytest.CaptureFixture[str]
) -> None:
    work = submitted.work.parent / "failing"
    shutil.copytree(submitted.work, work, ignore=shutil.ignore_patterns("submitit"))
    (folder,) = work.glob("regression-*")
    for name in ("prior.json", "prior.pt", "hydranet_n12_seed1_base.json"):
        (folder / name).unlink()
    (folder / "prior.pt").mkdir()  # a folder where the prior file goes: it cannot be written
    capsys.readouterr()
    assert _main(work.parent / "failing_out", work, *ENGINE) == 1
    error = capsys.readouterr().err
    assert f"prior ({folder / 'prior.json'})" in error
    assert "1 of 2 runs failed" in error and "IsADirectoryError" in error
    (line,) = [line for line in error.splitlines() if line.startswith("  prior (")]
    log = Path(line.rsplit("(log: ", 1)[1].removesuffix(")"))
    assert log.exists() and "IsADirectoryError" in log.read_text()
    assert (folder / "hydranet_n12_seed1_base.json").exists()  # the other run finished


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_worker_processes_end_with_the_command_on_sigterm(tmp_path) -> None:
    argv = [sys.executable, "-m", "benchmarks.regression", *SERIAL, "--jobs", "2",
            "--threads", "2", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path)]  # fmt: skip
    assert_sigterm_ends_the_workers(argv)


def test_worker_processes_give_the_serial_report(ci_run, tmp_path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    # two jobs of one thread each: the serial run's thread count, so the same numbers
    assert _main(out, work, "--jobs", "2", "--threads", "2") == 0
    payload = _payload(out)
    assert payload["config"]["execution"]["jobs"] == 2
    assert _without_seconds(payload["rows"]) == _without_seconds(ci_run.payload["rows"])

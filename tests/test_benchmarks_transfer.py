"""The transfer benchmark (the main job): the pipeline and its files, not its numbers.

One module-scoped run of ``--preset ci`` (every stage, every method, both regimes, 2 sizes
x 2 splits on tiny 4 mm volumes) is shared by the tests; they check the files it writes, the caching
(a rerun trains nothing), that a single cell recomputed alone gives the same numbers
(``--only``, seeded), and that results spread over several work folders merge into the same
table (``--merge``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from processes import assert_sigterm_ends_the_workers
from scipy import stats
from summaries import flat, summary_results

from benchmarks import transfer
from benchmarks.stages import digest
from benchmarks.transfer import cells, report, summary
from benchmarks.transfer.config import LR_FROM, LR_OF, setting

pytest.importorskip("nilearn")  # the cohorts' anatomy

CI = transfer.PRESETS["ci"]
N_CELLS = len(CI.methods) * len(CI.sizes) * CI.splits * len(CI.regimes)


def _cell(r: dict) -> tuple:
    return (r["regime"], r["method"], r["size"], r["split"])


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("transfer")
    work, out = root / "work", root / "out"
    args = ["--preset", "ci", "--seed", "0", "--work-dir", str(work), "--out", str(out)]
    args += ["--jobs", "1", "--threads", "1"]  # what test_parallel_jobs_... compares with
    assert transfer.main([*args, "--no-progress"]) == 0
    payload = json.loads((out / "transfer_ci.json").read_text())
    return SimpleNamespace(root=root, work=work, out=out, args=args, payload=payload)


def _results(work: Path, payload: dict) -> dict[tuple, Path]:
    """The result file of every cell of the report (not the other tuning candidates), by
    (regime, method, size, split)."""
    chosen = {_cell(r): (r["dice"], r["strategy"]) for r in payload["rows"]}
    out = {}
    for path in work.glob("runs/*/n*/split*/result.json"):
        record = json.loads(path.read_text())
        for regime in CI.regimes:
            cell = (regime, record["method"], record["size"], record["split"])
            if chosen[cell] == (record["dice"], record["strategy"]):
                out[cell] = path
    assert len(out) == N_CELLS
    return out


def test_ci_preset_writes_every_file(ci_run: SimpleNamespace) -> None:
    out = ci_run.out
    assert {p.name for p in out.iterdir()} >= {
        "transfer_ci.md",
        "transfer_ci.json",
        "transfer_ci.png",
    }
    assert (out / "transfer_ci.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = ci_run.payload["rows"]
    assert len(records) == N_CELLS
    assert {_cell(r) for r in records} == {
        (regime, c.method, c.size, c.split) for regime in CI.regimes for c in transfer.grid(CI)
    }
    for r in records:
        assert 0 <= r["dice"] <= 1 and 0 <= r["iou"] <= r["dice"] + 1e-9
        for metric in ("dice", "iou", "hd95", *cells.PER_VOLUME_UNCERTAINTY):
            assert len(r["test"][metric]) == CI.n_test, metric  # per test volume
        assert r["config"]["strategy"] == cells.strategy_name(r["method"])
        assert r["config"]["out_bias"] is True  # every method's network has the output bias
        chosen = ci_run.payload["config"]["regimes"][r["regime"]]["preset"]
        # the priors and L2-SP train at the learning rate chosen for fine-tuning
        owner = LR_FROM.get(r["method"], r["method"])
        assert r["config"]["lr"] == (chosen[LR_OF[owner]] if owner in LR_OF else CI.lr)
    config = ci_run.payload["config"]
    assert config["preset"]["sizes"] == list(CI.sizes)
    assert config["prior"]["n_kernels"] > 0 and len(config["prior"]["groups"]) == 7
    for prior in ("prior", "kernel_gaussian_prior", "swag_prior"):
        assert Path(config["prior"][prior]).exists(), prior
    assert Path(config["prior"]["figure"]).exists()
    text = (out / "transfer_ci.md").read_text()
    for label in transfer.LABELS.values():
        assert label in text
    assert "## The answer" in text and "Paired Dice differences" in text
    assert "python -m benchmarks.transfer" in text
    for regime in CI.regimes:
        assert f"## {regime.capitalize()} transfer" in text
        assert set(config["regimes"][regime]) >= {"summary", "selections", "subjects"}
    # one metric table per train size and regime
    for size in CI.sizes:
        assert text.count(f"{size} training volumes ({CI.n_test} test volumes") == 2


UNCERTAINTY_KEYS = {
    f"{k}_{where}"
    for k in ("accuracy", "nll", "brier", "ece", "auroc_mi", "auroc_entropy")
    for where in ("all", "roi")
} | {"roi_fraction", "passes"}


def test_records_and_report_hold_the_uncertainty_scores(ci_run: SimpleNamespace) -> None:
    for r in ci_run.payload["rows"]:
        bayesian = r["method"] in transfer.BAYESIAN
        tta = not bayesian and r["size"] in CI.tta_sizes
        assert set(r["uncertainty"]) == ({"model", "tta"} if tta else {"model"})
        for variant, scores in r["uncertainty"].items():
            assert set(scores) == UNCERTAINTY_KEYS, variant
            assert 0 <= scores["accuracy_all"] <= 1 and scores["nll_all"] > 0
            assert 0 <= scores["ece_roi"] <= 1 and 0 <= scores["brier_roi"] <= 2
            assert 0 < scores["roi_fraction"] <= 1
            assert 0 <= scores["auroc_entropy_roi"] <= 1
        # the Bayesian nets' test prediction averages eval_samples posterior samples
        model = r["uncertainty"]["model"]
        assert model["passes"] == ((CI.eval_samples or CI.uncertainty_samples) if bayesian else 1)
        if not bayesian:
            assert model["auroc_mi_all"] == 0.5  # a deterministic net's MI is 0 everywhere
        if tta:
            assert r["uncertainty"]["tta"]["passes"] == 2  # the left-right mirror
        assert 0 <= r["uncertainty_seconds"] <= r["eval_seconds"]
        # the means of the record are those of its per-volume scores
        for key in cells.PER_VOLUME_UNCERTAINTY:
            finite = [v for v in r["test"][key] if np.isfinite(v)]
            if finite:
                assert model[key] == pytest.approx(np.mean(finite)), key
    n_tta = len(transfer.METHODS) - len(transfer.BAYESIAN)
    for regime in CI.regimes:
        summary = ci_run.payload["config"]["regimes"][regime]["summary"]["uncertainty"]
        assert len(summary) == len(CI.methods) * len(CI.sizes) + n_tta * len(CI.tta_sizes)
        assert all(row["n"] == CI.splits for row in summary)
    text = (ci_run.out / "transfer_ci.md").read_text()
    assert "**Uncertainty** per test voxel" in text
    header = "| method | train size | passes | NLL | Brier | ECE | ECE (whole volume) | AUROC MI |"
    assert header in text
    for size in CI.tta_sizes:
        rows = [
            line for line in text.splitlines() if line.startswith(f"| UNet-PR + TTA | {size} |")
        ]
        assert len(rows) == len(CI.regimes)


def test_bayesian_records_report_their_posterior(ci_run: SimpleNamespace) -> None:
    """KL share and posterior scales, the diagnostics of a prior that does not help."""
    for r in ci_run.payload["rows"]:
        if r["method"] not in transfer.BAYESIAN:
            assert r["posterior"] is None
            continue
        posterior = r["posterior"]
        assert 0 < posterior["kl_share"] < 1
        assert posterior["sigma_median"] > 0 and posterior["snr_median"] > 0
        assert np.isfinite(posterior["log_sigma_change_median"])
    text = (ci_run.out / "transfer_ci.md").read_text()
    assert "| method | train size | KL share | sigma |" in text


def test_source_stage_reports_how_far_the_kernels_moved(ci_run: SimpleNamespace) -> None:
    sources = ci_run.payload["config"]["sources"]
    moved = sources["displacement"]
    assert len(moved) == 7  # the resolution groups
    assert all(v["relative"] > 0 and v["norm_ratio"] > 0 for v in moved.values())
    net = sources["nets"][0]
    assert Path(net["swag"]).exists() and len(net["cycle_epochs"]) == CI.source_restarts + 1
    assert "How far the source kernels moved" in (ci_run.out / "transfer_ci.md").read_text()


def test_kernel_displacement_matches_closed_forms(tmp_path: Path) -> None:
    """Unchanged kernels moved 0; kernels scaled by 3 moved ||3w - w|| / ||w|| = 2 and
    their norm ratio is 3."""
    from benchmarks.transfer.sources import initial_network, kernel_displacement

    initial = initial_network(CI, seed=7)
    torch.save(initial.state_dict(), tmp_path / "same.pt")
    scaled = {k: 3 * v if v.dim() == 5 else v for k, v in initial.state_dict().items()}
    torch.save(scaled, tmp_path / "scaled.pt")
    same = kernel_displacement(CI, initial, [tmp_path / "same.pt"])
    assert all(v["relative"] == 0 and v["norm_ratio"] == pytest.approx(1) for v in same.values())
    moved = kernel_displacement(CI, initial, [tmp_path / "scaled.pt"])
    for v in moved.values():
        assert v["relative"] == pytest.approx(2, rel=1e-5)
        assert v["norm_ratio"] == pytest.approx(3, rel=1e-5)
    # the network a seeded run starts from: built again, the same weights
    again = initial_network(CI, seed=7).state_dict()
    assert all(torch.equal(again[k], v) for k, v in initial.state_dict().items())


def test_uncertainty_summary_means_over_splits() -> None:
    preset = CI.replace(methods=("dwp", "random_init"), sizes=(2,), splits=2)

    def record(method: str, split: int, scores: dict | None) -> dict:
        base = {"method": method, "size": 2, "split": split, "dice": 0.5, "iou": 0.3}
        return base if scores is None else {**base, "uncertainty": scores}

    nan = float("nan")
    one_pass = {"passes": 1, "nll_roi": 0.4, "auroc_mi_roi": 0.5, "auroc_entropy_roi": nan}
    records = [
        record("dwp", 0, {"model": {"passes": 2, "nll_roi": 0.2, "auroc_mi_roi": 0.7}}),
        record("dwp", 1, {"model": {"passes": 2, "nll_roi": 0.4, "auroc_mi_roi": nan}}),
        record("random_init", 0, {"model": one_pass, "tta": {**one_pass, "passes": 2}}),
        record("random_init", 1, None),  # cached before the uncertainty was scored
    ]
    table = summary.summarise_uncertainty(records)
    assert set(table) == {
        ("dwp", 2, "model"),
        ("random_init", 2, "model"),
        ("random_init", 2, "tta"),
    }
    assert table["dwp", 2, "model"]["nll_roi"] == pytest.approx(0.3)
    assert table["dwp", 2, "model"]["auroc_mi_roi"] == pytest.approx(0.7)  # the finite one
    assert table["dwp", 2, "model"]["n"] == 2 and table["random_init", 2, "tta"]["n"] == 1
    text = report._uncertainty_table({"uncertainty": table}, preset)
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if "| 2 |" in line}
    assert lines["| UNet-DWP"].startswith("| UNet-DWP | 2 | 2 | 0.300 |")
    # one pass: no mutual information to rank by; no finite value: nothing to show
    assert lines["| UNet-RI"].endswith("| - | - |")
    assert lines["| UNet-RI + TTA"].endswith("| 0.500 | - |")


def test_training_summary_says_how_the_runs_ended(ci_run: SimpleNamespace) -> None:
    """Medians of epochs, best epoch and seconds; runs at the learning-rate floor and runs
    trapped at validation Dice 0 counted out of the runs that kept these fields; the ci
    report shows the table."""
    preset = CI.replace(methods=("pretrained",), sizes=(2,), splits=3)

    def record(
        split: int, epochs: int, best: int, reason: str, seconds: float, val_dice: float = 0.5
    ) -> dict:
        return {"method": "pretrained", "size": 2, "split": split, "epochs": epochs,
                "best_epoch": best, "stop_reason": reason, "train_seconds": seconds,
                "val_dice": val_dice}  # fmt: skip

    records = [
        record(0, 10, 4, "min_lr", 30.0),
        record(1, 40, 9, "max_epochs", 90.0, val_dice=0.0),
        record(2, 20, 5, "min_lr", 60.0, val_dice=1e-6),  # poor, not trapped
        {"method": "pretrained", "size": 2, "split": 3},  # cached before they were kept
    ]
    row = summary.training_table(records)["pretrained", 2]
    assert row == {"n": 3, "epochs_median": 20.0, "best_epoch_median": 5.0, "at_floor": 2,
                   "val_dice_zero": 1, "train_seconds_median": 60.0}  # fmt: skip
    text = report._training_table({"training": {("pretrained", 2): row}}, preset)
    assert "| UNet-PR | 2 | 20 | 5 | 2 of 3 | 1 of 3 | 60 |" in text
    assert f"{preset.steps} optimiser steps per run" in text
    converged = report._training_table({"training": {("pretrained", 2): row}},
                                       preset.replace(steps=0))  # fmt: skip
    assert "until ReduceLROnPlateau reaches its floor" in converged
    assert (
        "| method | train size | epochs | best epoch |"
        in (ci_run.out / "transfer_ci.md").read_text()
    )
    for item in ci_run.payload["config"]["regimes"].values():
        assert {r["method"] for r in item["summary"]["training"]} == set(CI.methods)


def test_subsets_are_nested_and_shared(ci_run: SimpleNamespace) -> None:
    by = {_cell(r): r for r in ci_run.payload["rows"]}
    for regime in CI.regimes:
        for split in range(CI.splits):
            ids = {m: by[regime, m, CI.sizes[0], split]["train_ids"] for m in CI.methods}
            assert all(v == ids["dwp"] for v in ids.values())  # same subset for every method
            small = set(by[regime, "dwp", CI.sizes[0], split]["train_ids"])
            assert small < set(by[regime, "dwp", CI.sizes[1], split]["train_ids"])  # nested
        subjects = ci_run.payload["config"]["regimes"][regime]["subjects"]
        pool, val, test = (set(subjects[k]) for k in ("pool", "val", "test"))
        assert len(pool) == CI.pool and len(val) == CI.n_val and len(test) == CI.n_test
        assert not (pool & val or pool & test or val & test)
        rows = [r for r in ci_run.payload["rows"] if r["regime"] == regime]
        assert all(set(r["train_ids"]) <= pool for r in rows)
        # each regime trains on its own target cohort
        assert all(i.startswith(transfer.REGIMES[regime]) for i in pool)
    assert transfer.split_indices(20, 5, 0, 0) != transfer.split_indices(20, 5, 1, 0)


def test_rerun_is_cached_and_one_cell_recomputes_identically(ci_run: SimpleNamespace) -> None:
    results = _results(ci_run.work, ci_run.payload)
    stamps = {k: p.stat().st_mtime_ns for k, p in results.items()}
    assert transfer.main([*ci_run.args, "--no-progress"]) == 0
    assert {k: p.stat().st_mtime_ns for k, p in results.items()} == stamps

    cell = ("far", "dwp", CI.sizes[0], 1)
    before = json.loads(results[cell].read_text())
    shutil.rmtree(results[cell].parent)
    only = f"method={cell[1]},size={cell[2]},split={cell[3]}"
    args = [*ci_run.args, "--regimes", "far", "--only", only, "--no-progress"]
    assert transfer.main(args) == 0
    after = json.loads(results[cell].read_text())
    assert after["dice"] == pytest.approx(before["dice"], abs=1e-6)
    assert after["test"]["dice"] == pytest.approx(before["test"]["dice"], abs=1e-6)
    # the posterior samples of the uncertainty scores are seeded too
    assert flat(after["uncertainty"]) == pytest.approx(flat(before["uncertainty"]), abs=1e-6)


def test_merge_of_two_work_folders_gives_the_same_table(
    ci_run: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    machines = [ci_run.root / "machine_a", ci_run.root / "machine_b"]
    # the scored cells, and the candidates not chosen, which were trained and validated only
    found = [*ci_run.work.glob("runs/*/n*/split*/result.json")]
    found += [p for p in ci_run.work.glob("runs/*/n*/split*/training.json")
              if not (p.parent / "result.json").exists()]  # fmt: skip
    assert any(p.name == "training.json" for p in found)
    for path in found:
        split = int(path.parent.name.removeprefix("split"))
        target = machines[split % 2] / path.relative_to(ci_run.work)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    for stage in ci_run.work.glob("prior-*"):
        shutil.copytree(stage, machines[1] / stage.name)
    out = ci_run.root / "merged"
    args = ["--preset", "ci", "--seed", "0", "--out", str(out)]
    assert transfer.main([*args, "--merge", *map(str, machines)]) == 0
    merged = json.loads((out / "transfer_ci.json").read_text())
    assert sorted(map(_cell, merged["rows"])) == sorted(map(_cell, ci_run.payload["rows"]))

    for regime in CI.regimes:
        summary = merged["config"]["regimes"][regime]["summary"]
        assert summary_results(summary) == pytest.approx(
            summary_results(ci_run.payload["config"]["regimes"][regime]["summary"]), nan_ok=True
        )
    assert merged["config"]["prior"]["n_kernels"] == ci_run.payload["config"]["prior"]["n_kernels"]
    # Another configuration's folders are not mixed in: with another seed nothing matches,
    # not even the cells its KL weight would be chosen on.
    assert transfer.main([*args, "--seed", "1", "--merge", *map(str, machines)]) == 2
    assert "no validation result" in capsys.readouterr().err


def test_only_the_chosen_candidate_is_scored_on_the_test_set(ci_run: SimpleNamespace) -> None:
    # every KL-weight candidate of the tuning cell trained and validated, in each regime;
    # the test set scored the chosen one only (as its grid cell)
    tuned = sorted(ci_run.work.glob(f"runs/dwp-*/n{min(CI.sizes)}/split0"))
    assert len(tuned) == len(CI.beta_grid) * len(CI.regimes) > len(CI.regimes)
    assert all((folder / "training.json").exists() for folder in tuned)
    assert sum((folder / "result.json").exists() for folder in tuned) == len(CI.regimes)


def test_settings_are_chosen_on_validation(ci_run: SimpleNamespace) -> None:
    for regime in CI.regimes:
        chosen = ci_run.payload["config"]["regimes"][regime]
        selections = {s["method"]: s for s in chosen["selections"]}
        assert set(selections) == set(CI.methods)  # every method has a strength to choose
        assert len(chosen["selections"]) == len(selections)  # each chosen once
        assert len(selections["dwp"]["candidates"]) == len(CI.beta_grid)
        assert len(selections["random_init"]["candidates"]) == len(CI.lr_grid)
        assert set(selections["swag"]["chosen"]) == {"swag_scale"}
        assert set(selections["l2_sp"]["chosen"]) == {"l2sp_alpha"}
        preset = chosen["preset"]
        for method, selection in selections.items():
            best = max(c["val_dice"] for c in selection["candidates"])
            (first,) = [c for c in selection["candidates"] if c["val_dice"] == best][:1]
            assert selection["chosen"] == {k: v for k, v in first.items() if k != "val_dice"}
            for name, value in selection["chosen"].items():
                assert preset[name] == value
            (row,) = [
                r
                for r in ci_run.payload["rows"]
                if (r["regime"], r["method"], r["size"], r["split"])
                == (regime, method, CI.sizes[0], 0)
            ]
            assert row["val_dice"] == best  # the chosen run is the grid's cell
    text = (ci_run.out / "transfer_ci.md").read_text()
    assert "chosen on the validation Dice" in text and "| swag_scale |" in text


def test_a_choice_among_trapped_candidates_says_so() -> None:
    """When every candidate has validation Dice 0 (all in the all-background trap), the
    grid's first value is taken by the tie rule: the report says it is no measurement."""
    preset = CI.replace(methods=("dwp",))

    def selection(scores: tuple[float, ...]) -> dict:
        pairs = zip((0.1, 1.0), scores, strict=True)
        candidates = [{"dwp_beta": b, "val_dice": v} for b, v in pairs]
        return {"method": "dwp", "size": 2, "split": 0, "chosen": {"dwp_beta": 0.1},
                "candidates": candidates}  # fmt: skip

    blind = report._selection_tables([selection((0.0, 0.0))], preset)
    assert "every candidate has Dice 0: the first is taken" in blind
    assert "every candidate" not in report._selection_tables([selection((0.0, 0.2))], preset)


def test_every_method_gets_the_same_validation_budget() -> None:
    from benchmarks.transfer.selection import budget

    for name in ("quick", "full", "paper"):
        preset = transfer.PRESETS[name]
        runs = budget(preset, preset.methods)
        assert set(runs.values()) == {5}, (name, runs)


def test_the_priors_are_chosen_after_fine_tuning_whose_learning_rate_they_share() -> None:
    from benchmarks.transfer.selection import choose_all, phases

    quick = transfer.PRESETS["quick"]
    first, second = phases(quick, quick.methods)
    assert first == {"pretrained", "pretrained_frozen", "random_init"}
    assert second == {"dwp", "kernel_gaussian", "swag", "normal_prior", "l2_sp"}
    assert phases(quick, {"dwp"}) == [{"pretrained"}, {"dwp"}]  # its lender is tuned too
    alone = quick.replace(methods=("dwp", "random_init"))
    assert phases(alone, {"dwp"}) == [{"dwp"}, set()]  # no lender: the preset's rate
    seen = []

    def score(candidate: transfer.Preset, method: str) -> float:
        seen.append((method, candidate.pr_lr))
        return candidate.pr_lr if method == "pretrained" else 0.5

    chosen, _ = choose_all(quick, ["dwp", "pretrained"], score)
    assert chosen.pr_lr == max(quick.lr_grid)
    # every DWP candidate was scored at fine-tuning's chosen rate
    assert {lr for m, lr in seen if m == "dwp"} == {max(quick.lr_grid)}
    assert cells.method_lr(chosen, "dwp") == cells.method_lr(chosen, "l2_sp") == chosen.pr_lr
    assert cells.method_lr(chosen, "random_init") == chosen.ri_lr


def test_choose_settings_ties_and_missing_results() -> None:
    preset = CI.replace(beta_grid=(1e-2, 1e-4, 1e-3), dwp_init_grid=("prior", "pretrained"))
    options = transfer.candidates(preset, "dwp")
    assert [o["dwp_beta"] for o in options] == [1e-4, 1e-4, 1e-3, 1e-3, 1e-2, 1e-2]
    scores = {(1e-3, "pretrained"): 0.7, (1e-2, "prior"): 0.7}
    chosen, selection = transfer.choose_settings(
        preset, "dwp", lambda p: scores.get((p.dwp_beta, p.dwp_init), 0.5)
    )
    # a tie goes to the earlier candidate: the smaller KL weight
    assert (chosen.dwp_beta, chosen.dwp_init) == (1e-3, "pretrained")
    assert selection["chosen"] == {"dwp_beta": 1e-3, "dwp_init": "pretrained"}
    assert chosen.normal_beta == preset.normal_beta  # the other method is untouched
    learning_rates = preset.replace(lr_grid=(1e-2, 1e-3))
    assert [o["ri_lr"] for o in transfer.candidates(learning_rates, "random_init")] == [1e-3, 1e-2]
    untuned = preset.replace(lr_grid=(), beta_grid=(), normal_init_grid=())
    assert transfer.choose_settings(untuned, "random_init", lambda p: 0.0) == (untuned, None)
    assert transfer.choose_settings(untuned, "normal_prior", lambda p: 0.0) == (untuned, None)
    with pytest.raises(ValueError, match="no validation result"):
        transfer.choose_settings(preset, "normal_prior", lambda p: None)


def _settings(record: dict) -> dict:
    """A run's strategy options without its file paths (they name the work folder)."""
    return {k: v for k, v in record["strategy"].items() if k not in ("source", "prior")}


def test_parallel_jobs_give_the_same_numbers(ci_run: SimpleNamespace) -> None:
    """Two worker processes of one thread each reproduce the serial 1-thread run, in a
    copy of the work folder (its cached stages name their files relative to themselves)."""
    work = ci_run.root / "parallel"
    shutil.copytree(ci_run.work, work, ignore=shutil.ignore_patterns("runs"))
    args = ["--preset", "ci", "--seed", "0", "--work-dir", str(work), "--out", str(work)]
    args += ["--regimes", "near", "--only", "split=0"]
    assert transfer.main([*args, "--jobs", "2", "--threads", "2"]) == 0
    serial = {
        (r["method"], r["size"]): r
        for r in ci_run.payload["rows"]
        if r["split"] == 0 and r["regime"] == "near"
    }
    parallel = [json.loads(p.read_text()) for p in work.glob("runs/*/n*/split0/result.json")]
    sources = [r["strategy"]["source"] for r in parallel if r["method"] == "pretrained"]
    assert sources and all(Path(s).is_relative_to(work) for s in sources)
    for record in parallel:  # tuning candidates included
        twin = serial.get((record["method"], record["size"]))
        if twin is not None and _settings(record) == _settings(twin):
            assert record["test"]["dice"] == pytest.approx(twin["test"]["dice"], abs=1e-6)
            serial.pop((record["method"], record["size"]))
    assert not serial, sorted(serial)  # every serial cell of split 0 was reproduced


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_worker_processes_end_with_the_command_on_sigterm(ci_run: SimpleNamespace) -> None:
    """SIGTERM (kill, a scheduler) reaches the command alone; its cells' workers must not
    train on, orphaned.  Other steps make every cell new; the stages before are cached."""
    work = ci_run.root / "terminated"
    shutil.copytree(ci_run.work, work, ignore=shutil.ignore_patterns("runs"))
    argv = [sys.executable, "-m", "benchmarks.transfer", "--preset", "ci", "--work-dir",
            str(work), "--out", str(work), "--set", "steps=50", "--jobs", "2", "--no-progress"]  # fmt: skip
    assert_sigterm_ends_the_workers(argv)


def test_paired_differences_match_scipy_and_closed_form() -> None:
    """Per-volume Dice of two methods on 3 splits x 4 test volumes: the paired table's
    mean, t-interval and p-value across splits are scipy's on the per-split means."""
    preset = CI.replace(methods=("pretrained", "random_init"), sizes=(2,), splits=3)
    rng = np.random.default_rng(0)
    pr = rng.uniform(0.5, 0.8, size=(3, 4))
    ri = pr - rng.normal(0.05, 0.03, size=(3, 4))
    records = [
        {"method": m, "size": 2, "split": s, "test": {"dice": list(values[s])}}
        for m, values in (("pretrained", pr), ("random_init", ri))
        for s in range(3)
    ]
    summary = transfer.summarise(records, preset)
    rows = {(p["method"], p["baseline"]): p for p in summary["paired"]}
    assert set(rows) == {("random_init", "pretrained"), ("pretrained", "random_init")}
    paired = rows["pretrained", "random_init"]  # does the source help at all?
    assert rows["random_init", "pretrained"]["mean"] == pytest.approx(-paired["mean"])
    diff = (pr - ri).mean(axis=1)
    assert paired["mean"] == pytest.approx(diff.mean())
    assert paired["p_value"] == pytest.approx(stats.ttest_rel(pr.mean(1), ri.mean(1)).pvalue)
    low, high = stats.t.interval(0.95, 2, loc=diff.mean(), scale=stats.sem(diff))
    assert paired["ci_splits"] == pytest.approx([low, high])
    assert paired["verdict"] in ("better", "worse", "no detectable difference")
    mean, lo, hi = summary["table"]["pretrained", 2]["dice"]
    assert mean == pytest.approx(pr.mean())
    assert (lo, hi) == pytest.approx(
        stats.t.interval(0.95, 2, loc=pr.mean(), scale=stats.sem(pr.mean(1)))
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--only", "method=dwp,size"], "--only"),
        (["--only", "colour=red"], "--only"),
        (["--set", "nonsense=1"], "--set"),
        (["--set", "dwp_init=sideways"], "dwp_init"),
        (["--set", "sizes=5,50"], "pool"),
        (["--merge", "/nonexistent/folder"], "/nonexistent/folder"),
        (["--jobs", "0"], "--jobs"),
        (["--set", "normal_init_grid=prior"], "normal_init"),
        (["--set", "regime=middle"], "unknown regime 'middle'"),
        (["--set", "regimes=near,middle"], "unknown regime 'middle'"),
        (["--set", "out_bias=maybe"], "out_bias is true or false, got 'maybe'"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert transfer.main(["--preset", "ci", *argv]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Stage keys, from the stages each Preset field declares

DATA = transfer.data_key(CI, 0)


def _keys(preset: transfer.Preset, seed: int = 0, data: dict = DATA) -> dict[str, str]:
    return {s: digest(transfer.stage_key(preset, s, seed, data)) for s in transfer.STAGES}


def _other_value(preset: transfer.Preset, name: str) -> object:
    """A value of field ``name`` other than ``preset``'s that makes a valid preset."""
    current = getattr(preset, name)
    allowed = {"vae_architecture": ("mlp", "conv"), "regime": tuple(transfer.REGIMES),
               **transfer.INITS}  # fmt: skip
    if isinstance(current, tuple):
        grid = allowed.get(name.removesuffix("_grid"), ())
        options = [current[:-1], current[1:], tuple(grid), preset.sizes[:1]]
        if all(isinstance(v, int | float) for v in current):
            options.insert(0, tuple(v * 2 for v in current))
    elif isinstance(current, str):
        options = list(allowed[name])
    else:
        options = [current * 2 + 1, current + 8, current - 1]
    for value in options:
        if value == current:
            continue
        try:
            preset.replace(**{name: value})
        except ValueError:
            continue
        return value
    raise AssertionError(f"no valid other value for {name} (a new kind of field?)")


def _downstream(preset: transfer.Preset, stages: set[str]) -> set[str]:
    """``stages`` and every stage that reads one of them, directly or not."""
    changed = set(stages)
    while True:
        more = {s for s in transfer.STAGES if set(transfer.upstream(preset, s)) & changed}
        if more <= changed:
            return changed
        changed |= more


def test_every_preset_field_declares_the_stages_it_changes() -> None:
    for f in dataclasses.fields(transfer.Preset):
        assert "stages" in f.metadata, f"{f.name}: declare its stages (setting(..., stages=))"
        assert set(f.metadata["stages"]) <= set(transfer.STAGES), f.name
    with pytest.raises(ValueError, match="unknown stages"):
        setting(0, stages=("nowhere",))


@pytest.mark.parametrize(
    "base",
    [CI, transfer.PRESETS["quick"], CI.replace(dwp_init="prior", normal_init="fresh")],
    ids=["ci", "quick", "fresh-inits"],
)
def test_changing_a_field_changes_the_keys_of_its_stages_and_of_no_other(
    base: transfer.Preset,
) -> None:
    before = _keys(base)
    assert len(set(before.values())) == len(transfer.STAGES)
    for f in dataclasses.fields(transfer.Preset):
        if f.name in WHERE:  # their own test below
            continue
        changed = base.replace(**{f.name: _other_value(base, f.name)})
        declared = set(f.metadata["stages"])
        expected = _downstream(base, declared) | _downstream(changed, declared)
        after = _keys(changed)
        assert {s for s in transfer.STAGES if after[s] != before[s]} == expected, f.name


WHERE = ("device", "amp", "out_bias")


def test_device_is_in_no_key_and_mixed_precision_in_every_training_stage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = _keys(CI)
    assert _keys(CI.replace(device="cpu")) == before
    mixed = _keys(CI.replace(amp="bf16"))
    assert {s for s in transfer.STAGES if mixed[s] != before[s]} == set(transfer.STAGES) - {
        "prior"  # the kernel VAE's fit does not autocast...
    } | _downstream(CI, {"source"})  # ...but reads the source nets, which do
    from benchmarks.transfer.sources import train_config

    config = train_config(CI.replace(amp="bf16"))
    assert (config.device, config.amp) == ("cpu", "bf16")
    # the float32 keys hold no "amp": caches made before the option stay valid
    assert "amp" not in transfer.stage_key(CI, "source", 0, DATA)
    for argv, message in (
        (["--device", "gpu"], "error: device 'gpu' is not a torch device"),
        (["--amp", "fp16"], "error: amp fp16 needs a CUDA device (device cpu)"),
    ):
        assert transfer.main(["--preset", "ci", *argv]) == 2
        assert capsys.readouterr().err.startswith(message)


def test_the_output_bias_is_in_the_keys_of_the_runs_only_and_only_when_on() -> None:
    biased, plain = _keys(CI), _keys(CI.replace(out_bias=False))
    assert CI.out_bias and transfer.PRESETS["quick"].out_bias
    # the source nets (the committed artefact) and the prior fitted on them are shared
    assert {s for s in transfer.STAGES if biased[s] != plain[s]} == set(transfer.METHODS)
    # the bias-free runs' keys hold no "out_bias": caches made before the option stay valid
    assert "out_bias" not in transfer.stage_key(CI.replace(out_bias=False), "dwp", 0, DATA)
    # the variational benchmark's preset is bias-free, as its committed runs were trained
    assert not transfer.PRESETS["single_source"].out_bias
    for value, expected in (("false", False), ("No", False), ("0", False), ("true", True)):
        assert transfer.override(CI, [f"out_bias={value}"]).out_bias is expected


def test_a_changed_source_invalidates_the_prior_and_the_runs_that_read_it() -> None:
    upstream = {s: set(transfer.upstream(CI, s)) for s in transfer.STAGES}
    assert upstream == {
        "source": set(),
        "prior": {"source"},
        # the learned priors start at the source network (fine-tuning's start)
        "dwp": {"prior", "source"},
        "kernel_gaussian": {"prior", "source"},
        "swag": {"prior", "source"},
        "normal_prior": {"source"},
        "l2_sp": {"source"},
        "pretrained": {"source"},
        "pretrained_frozen": {"source"},
        "random_init": set(),
    }
    fresh = CI.replace(dwp_init="prior", normal_init="fresh", learned_init="fresh")
    assert transfer.upstream(fresh, "dwp") == ("prior",)
    assert transfer.upstream(fresh, "swag") == ("prior",)
    assert transfer.upstream(fresh, "normal_prior") == ()  # He-initialised means
    before, other_seed = _keys(CI), _keys(CI, seed=1)
    assert all(before[s] != other_seed[s] for s in transfer.STAGES)
    own_target = _keys(CI, data={**DATA, "target": {"folder": "/somewhere"}})
    assert {s for s in transfer.STAGES if own_target[s] != before[s]} == set(transfer.METHODS)
    own_source = _keys(CI, data={**DATA, "source": {"folder": "/somewhere"}})
    assert {s for s in transfer.STAGES if own_source[s] != before[s]} == (
        _downstream(CI, {"source"})
    )
    far = transfer.data_key(CI.replace(regime="far"), 0)
    assert far["source"] == DATA["source"] and far["target"]["cohort"] == "tumour_t1"


def test_a_stage_version_bump_changes_its_key_and_those_downstream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Keys hold settings, not code: a stage whose code changed its results bumps its
    version, and no folder computed by the old code is reused (nor any built on it)."""
    from benchmarks.transfer import keys

    assert set(keys.STAGE_VERSIONS) == set(transfer.STAGES)
    base = CI
    before = _keys(base)
    monkeypatch.setitem(keys.STAGE_VERSIONS, "prior", keys.STAGE_VERSIONS["prior"] + 1)
    after = _keys(base)
    assert {s for s in transfer.STAGES if after[s] != before[s]} == _downstream(base, {"prior"})
    assert _downstream(base, {"prior"}) == {"prior", "dwp", "kernel_gaussian", "swag"}


def test_a_committed_artefact_stands_in_for_the_source_and_prior_stages(
    ci_run: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fresh work folder trains no source net when an artefact of its configuration is
    committed: the runs read its files; a tampered artefact stops the run with one line."""
    from benchmarks.transfer import artefact

    committed = ci_run.root / "artefacts"
    folder = artefact.export(CI, 0, transfer.data_key(CI, 0), ci_run.work, committed)
    monkeypatch.setattr(artefact, "ARTEFACTS", committed)
    work = ci_run.root / "fresh"
    args = ["--preset", "ci", "--seed", "0", "--work-dir", str(work), "--regimes", "near"]
    args += ["--only", "method=dwp+pretrained,size=2,split=0", "--jobs", "1", "--threads", "1"]
    assert transfer.main([*args, "--no-progress"]) == 0
    assert not list(work.glob("source-*")) and not list(work.glob("prior-*"))
    records = [json.loads(p.read_text()) for p in work.glob("runs/*/n2/split0/result.json")]
    assert {r["method"] for r in records} == {"dwp", "pretrained"}
    for r in records:
        assert Path(r["strategy"]["source"]).is_relative_to(folder)
    # the same numbers as the run that trained its own source nets
    serial = {
        r["method"]: r
        for r in ci_run.payload["rows"]
        if (r["regime"], r["size"], r["split"]) == ("near", 2, 0)
    }
    for r in records:
        if _settings(r) == _settings(serial[r["method"]]):
            assert r["test"]["dice"] == pytest.approx(serial[r["method"]]["test"]["dice"], abs=1e-6)
    (best,) = folder.glob("source-*/net0/best.pt")
    best.write_bytes(best.read_bytes()[:-1])
    shutil.rmtree(work)
    capsys.readouterr()
    assert transfer.main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "best.pt: SHA-256" in err and err.count("\n") == 1

"""The transfer benchmark (the main job): the pipeline and its files, not its numbers.

One module-scoped run of ``--preset ci`` (every stage, every method, 2 sizes x 2 splits on
tiny 4 mm volumes) is shared by the tests; they check the files it writes, the caching
(a rerun trains nothing), that a single cell recomputed alone gives the same numbers
(``--only``, seeded), and that results spread over several work folders merge into the same
table (``--merge``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from benchmarks import transfer
from benchmarks.stages import digest
from benchmarks.transfer.config import setting

pytest.importorskip("nilearn")  # the cohorts' anatomy

CI = transfer.PRESETS["ci"]
N_CELLS = len(CI.methods) * len(CI.sizes) * CI.splits


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
    """The result file of every cell of the report (not the other tuning candidates)."""
    chosen = {(r["method"], r["size"], r["split"]): r["dice"] for r in payload["rows"]}
    out = {}
    for path in work.glob("runs/*/n*/split*/result.json"):
        record = json.loads(path.read_text())
        cell = (record["method"], record["size"], record["split"])
        if record["dice"] == chosen[cell] and record["strategy"] == _strategy(payload, cell):
            out[cell] = path
    assert len(out) == N_CELLS
    return out


def _strategy(payload: dict, cell: tuple) -> dict:
    (row,) = [r for r in payload["rows"] if (r["method"], r["size"], r["split"]) == cell]
    return row["strategy"]


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
    assert {(r["method"], r["size"], r["split"]) for r in records} == {
        (c.method, c.size, c.split) for c in transfer.grid(CI)
    }
    for r in records:
        assert 0 <= r["dice"] <= 1 and 0 <= r["iou"] <= r["dice"] + 1e-9
        assert len(r["test"]["dice"]) == CI.n_test
        assert r["config"]["strategy"] == r["method"]
    config = ci_run.payload["config"]
    assert config["preset"]["sizes"] == list(CI.sizes)
    assert config["prior"]["n_kernels"] > 0 and len(config["prior"]["groups"]) == 7
    assert Path(config["prior"]["figure"]).exists()
    text = (out / "transfer_ci.md").read_text()
    for header in ("UNet-DWP", "UNet-PR", "UNet-PRf", "UNet-RI", "UNet-N(0,1)"):
        assert header in text
    assert "Paired Dice differences" in text and "python -m benchmarks.transfer" in text
    # One row per train size in both tables, mean (std) cells.
    for size in CI.sizes:
        assert sum(line.startswith(f"| {size} |") for line in text.splitlines()) == 2


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
        # CI's eval_samples is 0: the Bayesian nets' MI comes from uncertainty_samples
        model = r["uncertainty"]["model"]
        assert model["passes"] == (CI.uncertainty_samples if bayesian else 1)
        if not bayesian:
            assert model["auroc_mi_all"] == 0.5  # a deterministic net's MI is 0 everywhere
        if tta:
            assert r["uncertainty"]["tta"]["passes"] == 2  # the left-right mirror
        assert 0 <= r["uncertainty_seconds"] <= r["eval_seconds"]
    summary = ci_run.payload["config"]["summary"]["uncertainty"]
    n_tta = len(transfer.METHODS) - len(transfer.BAYESIAN)
    assert len(summary) == len(CI.methods) * len(CI.sizes) + n_tta * len(CI.tta_sizes)
    assert all(row["n"] == CI.splits for row in summary)
    text = (ci_run.out / "transfer_ci.md").read_text()
    assert "**Uncertainty** per test voxel" in text
    header = "| method | train size | passes | NLL | Brier | ECE | ECE (whole volume) | AUROC MI |"
    assert header in text
    for size in CI.tta_sizes:
        assert (
            sum(line.startswith(f"| UNet-PR + TTA | {size} | 2 |") for line in text.splitlines())
            == 1
        )


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
    summary = transfer.summarise(records, preset)
    table = summary["uncertainty"]
    assert set(table) == {
        ("dwp", 2, "model"),
        ("random_init", 2, "model"),
        ("random_init", 2, "tta"),
    }
    assert table["dwp", 2, "model"]["nll_roi"] == pytest.approx(0.3)
    assert table["dwp", 2, "model"]["auroc_mi_roi"] == pytest.approx(0.7)  # the finite one
    assert table["dwp", 2, "model"]["n"] == 2 and table["random_init", 2, "tta"]["n"] == 1
    text = transfer.render(summary, {}, preset)
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if "| 2 |" in line}
    assert lines["| UNet-DWP"].startswith("| UNet-DWP | 2 | 2 | 0.300 |")
    # one pass: no mutual information to rank by; no finite value: nothing to show
    assert lines["| UNet-RI"].endswith("| - | - |")
    assert lines["| UNet-RI + TTA"].endswith("| 0.500 | - |")


def test_subsets_are_nested_and_shared(ci_run: SimpleNamespace) -> None:
    by = {(r["method"], r["size"], r["split"]): r for r in ci_run.payload["rows"]}
    for split in range(CI.splits):
        ids = {m: by[m, CI.sizes[0], split]["train_ids"] for m in CI.methods}
        assert all(v == ids["dwp"] for v in ids.values())  # same subset for every method
        small = set(by["dwp", CI.sizes[0], split]["train_ids"])
        assert small < set(by["dwp", CI.sizes[1], split]["train_ids"])  # nested
    assert transfer.split_indices(20, 5, 0, 0) != transfer.split_indices(20, 5, 1, 0)
    subjects = ci_run.payload["config"]["subjects"]
    pool, val, test = (set(subjects[k]) for k in ("pool", "val", "test"))
    assert len(pool) == CI.pool and len(val) == CI.n_val and len(test) == CI.n_test
    assert not (pool & val or pool & test or val & test)
    assert all(set(r["train_ids"]) <= pool for r in ci_run.payload["rows"])


def test_rerun_is_cached_and_one_cell_recomputes_identically(ci_run: SimpleNamespace) -> None:
    results = _results(ci_run.work, ci_run.payload)
    stamps = {k: p.stat().st_mtime_ns for k, p in results.items()}
    assert transfer.main([*ci_run.args, "--no-progress"]) == 0
    assert {k: p.stat().st_mtime_ns for k, p in results.items()} == stamps

    cell = ("dwp", CI.sizes[0], 1)
    before = json.loads(results[cell].read_text())
    shutil.rmtree(results[cell].parent)
    only = f"method={cell[0]},size={cell[1]},split={cell[2]}"
    assert transfer.main([*ci_run.args, "--only", only, "--no-progress"]) == 0
    after = json.loads(results[cell].read_text())
    assert after["dice"] == pytest.approx(before["dice"], abs=1e-6)
    assert after["test"]["dice"] == pytest.approx(before["test"]["dice"], abs=1e-6)
    # the posterior samples of the uncertainty scores are seeded too
    assert _flat(after["uncertainty"]) == pytest.approx(_flat(before["uncertainty"]), abs=1e-6)


def _flat(value: object, path: tuple = ()) -> dict[tuple, object]:
    """Nested dicts and lists as one flat ``{path: leaf}`` dict (``pytest.approx`` compares
    flat mappings only)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {path: value}
    return {k: v for key, item in items for k, v in _flat(item, (*path, key)).items()}


def test_merge_of_two_work_folders_gives_the_same_table(
    ci_run: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    machines = [ci_run.root / "machine_a", ci_run.root / "machine_b"]
    for path in ci_run.work.glob("runs/*/n*/split*/result.json"):  # tuning candidates too
        split = json.loads(path.read_text())["split"]
        target = machines[split % 2] / path.relative_to(ci_run.work)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    for stage in ci_run.work.glob("prior-*"):
        shutil.copytree(stage, machines[1] / stage.name)
    out = ci_run.root / "merged"
    args = ["--preset", "ci", "--seed", "0", "--out", str(out)]
    assert transfer.main([*args, "--merge", *map(str, machines)]) == 0
    merged = json.loads((out / "transfer_ci.json").read_text())
    key = lambda r: (r["method"], r["size"], r["split"])  # noqa: E731
    assert sorted(map(key, merged["rows"])) == sorted(map(key, ci_run.payload["rows"]))
    assert _flat(merged["config"]["summary"]) == pytest.approx(
        _flat(ci_run.payload["config"]["summary"])
    )
    assert merged["config"]["prior"]["n_kernels"] == ci_run.payload["config"]["prior"]["n_kernels"]
    # Another configuration's folders are not mixed in: with another seed nothing matches,
    # not even the cells its KL weight would be chosen on.
    assert transfer.main([*args, "--seed", "1", "--merge", *map(str, machines)]) == 2
    assert "no validation result" in capsys.readouterr().err


def test_settings_are_chosen_on_validation(ci_run: SimpleNamespace) -> None:
    selections = {s["method"]: s for s in ci_run.payload["config"]["selections"]}
    assert set(selections) == {"dwp", "normal_prior"}
    # dwp: KL weight x initialisation; normal_prior: KL weight only (its init grid is empty)
    assert len(selections["dwp"]["candidates"]) == len(CI.beta_grid) * len(CI.dwp_init_grid)
    assert len(selections["normal_prior"]["candidates"]) == len(CI.beta_grid)
    assert set(selections["normal_prior"]["chosen"]) == {"normal_beta"}
    preset = ci_run.payload["config"]["preset"]
    for method, selection in selections.items():
        best = max(c["val_dice"] for c in selection["candidates"])
        (chosen,) = [c for c in selection["candidates"] if c["val_dice"] == best][:1]
        assert selection["chosen"] == {k: v for k, v in chosen.items() if k != "val_dice"}
        for name, value in selection["chosen"].items():
            assert preset[name] == value
        (row,) = [
            r
            for r in ci_run.payload["rows"]
            if r["method"] == method and r["size"] == CI.sizes[0] and r["split"] == 0
        ]
        assert row["val_dice"] == best  # the chosen run is the grid's cell
    text = (ci_run.out / "transfer_ci.md").read_text()
    assert "settings chosen on the validation Dice" in text and "| dwp_init |" in text


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
    assert transfer.choose_settings(preset, "random_init", lambda p: 0.0) == (preset, None)
    untuned = preset.replace(beta_grid=(), normal_init_grid=())
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
    assert transfer.main([*args, "--jobs", "2", "--threads", "2", "--only", "split=0"]) == 0
    serial = {(r["method"], r["size"]): r for r in ci_run.payload["rows"] if r["split"] == 0}
    parallel = [json.loads(p.read_text()) for p in work.glob("runs/*/n*/split0/result.json")]
    sources = [r["strategy"]["source"] for r in parallel if r["method"] == "pretrained"]
    assert sources and all(Path(s).is_relative_to(work) for s in sources)
    for record in parallel:  # tuning candidates included
        twin = serial.get((record["method"], record["size"]))
        if twin is not None and _settings(record) == _settings(twin):
            assert record["test"]["dice"] == pytest.approx(twin["test"]["dice"], abs=1e-6)
            serial.pop((record["method"], record["size"]))
    assert not serial, sorted(serial)  # every serial cell of split 0 was reproduced


def test_paired_differences_match_scipy_and_closed_form() -> None:
    preset = CI.replace(methods=("dwp", "random_init"), sizes=(2,), splits=3)
    dwp_dice, ri_dice = [0.50, 0.62, 0.58], [0.45, 0.60, 0.49]
    records = [
        {"method": m, "size": 2, "split": s, "dice": d, "iou": d / 2}
        for m, values in (("dwp", dwp_dice), ("random_init", ri_dice))
        for s, d in enumerate(values)
    ]
    summary = transfer.summarise(records, preset)
    diff = np.subtract(dwp_dice, ri_dice)
    t = diff.mean() / (diff.std(ddof=1) / np.sqrt(3))
    (paired,) = summary["paired"]
    assert paired["mean_diff"] == pytest.approx(diff.mean())
    assert paired["std_diff"] == pytest.approx(diff.std(ddof=1))
    assert paired["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), df=2))
    assert summary["table"]["dwp", 2]["dice"] == pytest.approx(
        (np.mean(dwp_dice), np.std(dwp_dice, ddof=1))
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
    allowed = {"vae_architecture": ("mlp", "conv"), **transfer.INITS}
    if isinstance(current, tuple):
        grid = allowed.get(name.removesuffix("_grid"), ())
        options = [current[:-1], current[1:], tuple(grid)]
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
    [CI, transfer.PRESETS["quick"], CI.replace(dwp_init="pretrained", normal_init="pretrained")],
    ids=["ci", "quick", "pretrained-inits"],
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


WHERE = ("device", "amp")


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


def test_a_changed_source_invalidates_the_prior_and_the_runs_that_read_it() -> None:
    upstream = {s: transfer.upstream(CI, s) for s in transfer.STAGES}
    assert upstream == {
        "source": (),
        "prior": ("source",),
        "dwp": ("prior",),
        "pretrained": ("source",),
        "pretrained_frozen": ("source",),
        "random_init": (),
        "normal_prior": (),  # He-initialised means: the source nets are not read
    }
    both = CI.replace(dwp_init="pretrained", normal_init="pretrained")
    assert set(transfer.upstream(both, "dwp")) == {"prior", "source"}
    assert transfer.upstream(both, "normal_prior") == ("source",)
    before, other_seed = _keys(CI), _keys(CI, seed=1)
    assert all(before[s] != other_seed[s] for s in transfer.STAGES)
    own_target = _keys(CI, data={**DATA, "target": {"folder": "/somewhere"}})
    assert {s for s in transfer.STAGES if own_target[s] != before[s]} == set(transfer.METHODS)
    own_source = _keys(CI, data={**DATA, "source": {"folder": "/somewhere"}})
    assert {s for s in transfer.STAGES if own_source[s] != before[s]} == (
        _downstream(CI, {"source"})
    )


def test_a_stage_version_bump_changes_its_key_and_those_downstream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Keys hold settings, not code: a stage whose code changed its results bumps its
    version, and no folder computed by the old code is reused (nor any built on it)."""
    from benchmarks.transfer import keys

    assert set(keys.STAGE_VERSIONS) == set(transfer.STAGES)
    base = CI.replace(dwp_init="pretrained", normal_init="pretrained")
    before = _keys(base)
    monkeypatch.setitem(keys.STAGE_VERSIONS, "prior", keys.STAGE_VERSIONS["prior"] + 1)
    after = _keys(base)
    assert {s for s in transfer.STAGES if after[s] != before[s]} == _downstream(base, {"prior"})
    assert _downstream(base, {"prior"}) == {"prior", "dwp"}

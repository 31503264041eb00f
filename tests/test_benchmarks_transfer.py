"""The transfer benchmark (the main job): the pipeline and its files, not its numbers.

One module-scoped run of ``--preset ci`` (every stage, every method, 2 sizes x 2 splits on
tiny 4 mm volumes) is shared by the tests; they check the files it writes, the caching
(a rerun trains nothing), that a single cell recomputed alone gives the same numbers
(``--only``, seeded), and that results spread over several work folders merge into the same
table (``--merge``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from benchmarks import transfer

pytest.importorskip("nilearn")  # the cohorts' anatomy

CI = transfer.PRESETS["ci"]
N_CELLS = len(CI.methods) * len(CI.sizes) * CI.splits


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("transfer")
    work, out = root / "work", root / "out"
    args = ["--preset", "ci", "--seed", "0", "--work-dir", str(work), "--out", str(out)]
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
    assert merged["config"]["summary"] == pytest.approx(ci_run.payload["config"]["summary"])
    assert merged["config"]["prior"]["n_kernels"] == ci_run.payload["config"]["prior"]["n_kernels"]
    # Another configuration's folders are not mixed in: with another seed nothing matches,
    # not even the cells its KL weight would be chosen on.
    assert transfer.main([*args, "--seed", "1", "--merge", *map(str, machines)]) == 2
    assert "no validation result" in capsys.readouterr().err


def test_kl_weight_is_chosen_on_validation(ci_run: SimpleNamespace) -> None:
    selections = ci_run.payload["config"]["selections"]
    assert {s["method"] for s in selections} == {"dwp", "normal_prior"}
    for selection in selections:
        scores = selection["val_dice"]
        assert len(scores) == len(CI.beta_grid)
        assert scores[f"{selection['chosen']:g}"] == max(scores.values())
        field = transfer.BETA_FIELD[selection["method"]]
        assert ci_run.payload["config"]["preset"][field] == selection["chosen"]
        (row,) = [
            r
            for r in ci_run.payload["rows"]
            if r["method"] == selection["method"] and r["size"] == CI.sizes[0] and r["split"] == 0
        ]
        assert row["val_dice"] == max(scores.values())  # the chosen run is the grid's cell
    assert "KL weight chosen on validation" in (ci_run.out / "transfer_ci.md").read_text()


def test_choose_beta_ties_and_missing_results() -> None:
    preset = CI.replace(beta_grid=(1e-2, 1e-4, 1e-3))
    scores = {1e-2: 0.5, 1e-4: 0.7, 1e-3: 0.7}
    chosen, selection = transfer.choose_beta(preset, "dwp", lambda p: scores[p.dwp_beta])
    assert chosen.dwp_beta == 1e-4 and chosen.normal_beta == preset.normal_beta
    assert selection["chosen"] == 1e-4
    assert transfer.choose_beta(preset, "random_init", lambda p: 0.0) == (preset, None)
    with pytest.raises(ValueError, match="no validation result"):
        transfer.choose_beta(preset, "normal_prior", lambda p: None)


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
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert transfer.main(["--preset", "ci", *argv]) == 2
    assert message in capsys.readouterr().err

"""Smoke tests of the speed benchmark and the shared result writer.

Wall times depend on the machine, so nothing here asserts a timing value: only that the
benchmark runs end to end and writes well-formed results.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from benchmarks import report, speed

VARIANTS = ["deterministic", *speed.TARGETS]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One ``--quick`` run shared by the tests below (it is the slow part)."""
    out = tmp_path_factory.mktemp("speed")
    assert speed.main(["--quick", "--seed", "3", "--out", str(out)]) == 0
    return out, json.loads((out / "speed_quick.json").read_text())


def test_quick_run_writes_json_and_markdown(quick_run: tuple[Path, dict]) -> None:
    out, result = quick_run
    assert sorted(p.name for p in out.iterdir()) == ["speed_quick.json", "speed_quick.md"]
    markdown = (out / "speed_quick.md").read_text()
    assert "QUICK" in markdown
    assert (
        "| variant | median step (s) | IQR | ratio vs deterministic | target | met? |" in markdown
    )
    assert "python -m benchmarks.speed --quick --seed 3 --out" in markdown
    assert result["command"].startswith("python -m benchmarks.speed --quick")


def test_quick_run_records_config_and_environment(quick_run: tuple[Path, dict]) -> None:
    _, result = quick_run
    config = result["config"]
    assert config["quick"] is True
    assert config["seed"] == 3
    assert config["steps"] == speed.QUICK_STEPS
    assert config["size"] == speed.QUICK_SIZE
    assert config["targets"] == speed.TARGETS
    assert result["environment"]["torch"] == torch.__version__
    assert {"python", "platform", "num_threads", "git_commit"} <= result["environment"].keys()


def test_quick_run_has_one_row_per_variant(quick_run: tuple[Path, dict]) -> None:
    _, result = quick_run
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == VARIANTS
    for name, row in rows.items():
        assert len(row["times_s"]) == speed.QUICK_STEPS
        assert all(t > 0 for t in row["times_s"])
        assert row["median_s"] > 0 and row["iqr_s"] >= 0
        assert row["saved_for_backward_mib"] > 0
        if name == "deterministic":
            assert row["ratio_vs_deterministic"] == 1.0
            assert row["target_ratio"] is None and row["met"] is None
        else:
            assert row["ratio_vs_deterministic"] > 0
            assert row["target_ratio"] == speed.TARGETS[name]
            assert isinstance(row["met"], bool)


def test_bayesian_variants_have_more_parameters(quick_run: tuple[Path, dict]) -> None:
    # A silently failed bayesianize would still time fine; the log-sigmas give it away.
    _, result = quick_run
    params = {row["variant"]: row["parameters"] for row in result["rows"]}
    for name in speed.TARGETS:
        assert params[name] > params["deterministic"]


def test_same_seed_same_computation(quick_run: tuple[Path, dict], tmp_path: Path) -> None:
    _, first = quick_run
    speed.main(["--quick", "--seed", "3", "--steps", "2", "--out", str(tmp_path)])
    second = json.loads((tmp_path / "speed_quick.json").read_text())
    for a, b in zip(first["rows"], second["rows"], strict=True):
        # The first (warm-up) loss depends only on the seed, not on how many rounds follow.
        assert a["loss_first"] == pytest.approx(b["loss_first"], rel=1e-5)


@pytest.mark.parametrize(
    "argv",
    [["--steps", "5"], ["--quick", "--steps", "1"], ["--quick", "--size", "20"], ["--batch", "0"]],
)
def test_rejects_unreportable_settings(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        speed.parse_args(argv)


def test_unet_like_stack_shapes() -> None:
    net = speed.unet_like_stack()
    assert net(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)
    assert sum(isinstance(m, torch.nn.Conv3d) for m in net.modules()) == 15


def test_write_results_is_atomic_and_complete(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "results"  # created on demand
    rows = [{"variant": "a", "median_s": 0.5}, {"variant": "b", "median_s": 1.0}]
    table = report.markdown_table(["variant", "median"], [["a", 0.5], ["b", 1.0]])
    json_path, md_path = report.write_results(
        "demo", {"seed": 1}, rows, table, out, command="python -m demo --seed 1"
    )

    assert sorted(p.name for p in out.iterdir()) == ["demo.json", "demo.md"]  # no temp files
    payload = json.loads(json_path.read_text())
    assert payload["config"] == {"seed": 1}
    assert payload["rows"] == rows
    assert payload["command"] == "python -m demo --seed 1"
    assert payload["environment"]["torch"] == torch.__version__
    markdown = md_path.read_text()
    assert table in markdown and "python -m demo --seed 1" in markdown
    # Not mkstemp's owner-only 0600: the permissions of a plainly created file.
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (json_path, md_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_write_results_keeps_old_results_when_a_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report.write_results("demo", {"run": 1}, [], "| x |", tmp_path, command="first")

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        report.write_results("demo", {"run": 2}, [], "| x |", tmp_path, command="second")
    monkeypatch.undo()

    # The interrupted write left neither a half-written result nor its temporary file.
    assert json.loads((tmp_path / "demo.json").read_text())["config"] == {"run": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json", "demo.md"]
    report.write_results("demo", {"run": 3}, [], "| x |", tmp_path, command="third")
    assert json.loads((tmp_path / "demo.json").read_text())["config"] == {"run": 3}


def test_markdown_table_escapes_and_checks_width() -> None:
    table = report.markdown_table(["a", "b"], [["x|y", 1]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1 |"]
    with pytest.raises(ValueError, match="row 0"):
        report.markdown_table(["a", "b"], [[1]])

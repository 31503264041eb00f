"""The regression benchmark's pipeline runs end to end and writes its files (``ci`` preset).

Numbers are not asserted: two training steps per network measure nothing.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import regression


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("regression")
    assert regression.main(["--preset", "ci", "--seed", "1", "--out", str(out)]) == 0
    return out


def test_ci_preset_writes_tables_json_and_figures(ci_run) -> None:
    names = sorted(p.name for p in ci_run.iterdir())
    assert names == [
        "regression_ci.json",
        "regression_ci.md",
        "regression_ci_hydranet.png",
        "regression_ci_importance.png",
        "regression_ci_local_maps.png",
    ]
    for png in ci_run.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (ci_run / "regression_ci.md").read_text()
    for heading in ("## (a) BagNet", "## (b) Hydranet", "## (c) Importance"):
        assert heading in markdown
    assert "python -m benchmarks.regression --preset ci --seed 1" in markdown


def test_json_rows_cover_every_section_and_method(ci_run) -> None:
    result = json.loads((ci_run / "regression_ci.json").read_text())
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

"""The content-keyed stage cache shared by the benchmarks (``benchmarks.stages``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks.stages import Stage, digest, located, stage_folder

STAGE = Stage("fit", "fit.json", files=("model", "checkpoints"))


def test_digest_depends_on_the_content_not_the_order() -> None:
    assert digest({"a": 1, "b": [2, 3]}) == digest({"b": [2, 3], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})
    assert len(digest({})) == 12


def test_a_folder_per_key_with_its_config(tmp_path: Path) -> None:
    key = {"stage": "fit", "epochs": 3}
    folder = stage_folder(tmp_path, "fit", key, create=False)
    assert folder == tmp_path / f"fit-{digest(key)}" and not folder.exists()
    assert stage_folder(tmp_path, "fit", key) == folder
    assert json.loads((folder / "config.json").read_text()) == key
    assert stage_folder(tmp_path, "fit", {**key, "epochs": 4}) != folder


def test_open_finish_and_reopen(tmp_path: Path) -> None:
    key = {"epochs": 3}
    folder, cached = STAGE.open(tmp_path, key)
    assert cached is None and (folder / "config.json").exists()
    summary = {
        "model": str(folder / "model.pt"),
        "runs": [{"checkpoints": [str(folder / "a.pt"), str(folder / "b.pt")], "score": 1.5}],
        "figure": None,
    }
    assert STAGE.finish(folder, summary) == summary
    stored = json.loads((folder / "fit.json").read_text())
    assert stored["model"] == "model.pt"
    assert stored["runs"][0] == {"checkpoints": ["a.pt", "b.pt"], "score": 1.5}
    assert STAGE.open(tmp_path, key) == (folder, summary)
    assert STAGE.open(tmp_path, {"epochs": 4})[1] is None


def test_a_moved_work_folder_names_its_own_files(tmp_path: Path) -> None:
    key = {"epochs": 3}
    folder, _ = STAGE.open(tmp_path / "a", key)
    STAGE.finish(folder, {"model": str(folder / "model.pt")})
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = STAGE.folder(tmp_path / "b", key, create=False)
    assert STAGE.open(tmp_path / "b", key)[1] == {"model": str(moved / "model.pt")}
    # find: the first root that has the stage finished
    assert STAGE.find([tmp_path / "none", tmp_path / "b", tmp_path / "a"], key) == {
        "model": str(moved / "model.pt")
    }
    assert STAGE.find([tmp_path / "none"], key) is None


def test_located_round_trip() -> None:
    folder = Path("/work/stage")
    summary = {"model": "m.pt", "nested": [{"checkpoints": ["a.pt"]}], "other": "x.pt"}
    absolute = located(summary, folder, ("model", "checkpoints"))
    assert absolute == {
        "model": "/work/stage/m.pt",
        "nested": [{"checkpoints": ["/work/stage/a.pt"]}],
        "other": "x.pt",
    }
    assert located(absolute, folder, ("model", "checkpoints"), inverse=True) == summary

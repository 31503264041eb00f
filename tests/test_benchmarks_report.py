"""The result writer every benchmark shares: atomic, complete JSON + Markdown pairs."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from benchmarks import report


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

"""README.md stays true: its Python examples run, and CI runs exactly its test command."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


@pytest.mark.parametrize("index", range(len(_code_blocks(README, "python"))))
def test_python_examples_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files (e.g. prior.pt)
    code = _code_blocks(README, "python")[index]
    exec(compile(code, f"README.md:python-block-{index}", "exec"), {"__name__": "readme"})


def test_quickstart_exists():
    assert len(_code_blocks(_section("Quickstart"), "python")) == 1


def test_ci_runs_the_readme_test_command():
    blocks = _code_blocks(_section("The two commands"), "bash")
    assert len(blocks) == 2, "the README gives two commands: main job, tests"
    test_command = blocks[1].strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines

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


def _ci_lines() -> list[str]:
    return [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]


def test_ci_runs_the_readme_test_command():
    blocks = _code_blocks(_section("The two commands"), "bash")
    assert len(blocks) == 2, "the README gives two commands: main job, tests"
    test_command = blocks[1].strip()
    assert test_command in _ci_lines()


def test_ci_installs_as_the_readme_says():
    """CI installs with the README's first install block, line for line and in order (what
    a newcomer copies), so that a green CI means those commands work."""
    block = _code_blocks(_section("Install"), "bash")[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    commands = [command for command in commands if command]
    assert commands, "the README's install block is empty"
    ci_lines = _ci_lines()
    missing = [command for command in commands if command not in ci_lines]
    assert not missing, f".ci/run lacks the README's install commands {missing}"
    positions = [ci_lines.index(command) for command in commands]
    assert positions == sorted(positions), ".ci/run runs the install commands in another order"

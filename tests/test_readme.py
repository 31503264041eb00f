"""README.md stays true: its quickstart runs, and CI runs exactly its test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_quickstart_runs():
    (code,) = _code_blocks(_section("Quickstart"), "python")
    exec(compile(code, "README.md:quickstart", "exec"), {"__name__": "quickstart"})


def test_ci_runs_the_readme_test_command():
    blocks = _code_blocks(_section("The two commands"), "bash")
    assert len(blocks) == 2, "the README gives two commands: main job, tests"
    test_command = blocks[1].strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines

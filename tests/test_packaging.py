"""The distribution as a newcomer installs it.

Every third-party import is declared in the extra its package needs; each command's check
covers what the command reaches; a core install (simulated: the extras' modules blocked)
answers every console script with ``--version`` or with one ``error:`` line naming the
extra; every command has ``--version``; the license, ``py.typed`` and the one version
source.  A real install from scratch needs a network: ``.ci/run`` does it on every run.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import json
import pickle
import re
import subprocess
import sys
import types
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

import benchmarks.entry
import cohorts.entry
from dwp import __version__
from dwp.extras import (
    EXIT_MISSING_EXTRA,
    MissingExtraError,
    add_version_argument,
    exit_on_missing_extra,
    from_extra,
    is_installed,
    launch,
    require,
)

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
PACKAGES = ("dwp", "unet3d", "regression3d", "cohorts", "nifti_io", "benchmarks")
#: modules of tests/ imported by other tests (``import kernel_nets``)
TEST_HELPERS = {path.stem for path in (ROOT / "tests").glob("*.py")}

#: Where a file lives -> the extras it may use beyond the core install (the longest
#: matching prefix wins).  A new optional dependency goes into an extra and here.
NEEDS = {
    "dwp": (),
    "dwp/plot.py": ("plot",),
    "dwp/cli/report.py": ("plot",),  # the fit report's figure
    "dwp/train_log.py": ("plot", "tensorboard"),  # curves.png, TensorBoard events
    "nifti_io": (),
    "unet3d": ("unet3d",),
    "regression3d": ("regression",),
    "cohorts": ("cohorts",),
    "benchmarks": ("bench",),
    "benchmarks/grid.py": ("grid",),
    "tests": ("test",),
}
#: Import name -> distribution name (PyPI's, normalised).  A dotted key claims a submodule
#: that needs another distribution than its package.
DISTRIBUTIONS = {
    "torch.utils.tensorboard": "tensorboard",
    "torch": "torch",
    "pyro": "pyro-ppl",
    "numpy": "numpy",
    "tqdm": "tqdm",
    "nibabel": "nibabel",
    "matplotlib": "matplotlib",
    "monai": "monai",
    "scipy": "scipy",
    "nilearn": "nilearn",
    "sklearn": "scikit-learn",
    "pytest": "pytest",
    "hypothesis": "hypothesis",
    "tensorboard": "tensorboard",
    "submitit": "submitit",
}
#: Optional features that the code checks where they are used (``dwp.extras.require``),
#: so a command does not need them to start: TensorBoard logs, submitit grids.
CHECKED_AT_USE = {"tensorboard", "submitit"}


# ---------------------------------------------------------------------------------------------
# pyproject.toml


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse(requirement: str) -> tuple[str, list[str]]:
    """``"dwp[a,b]>=1; marker"`` -> ``("dwp", ["a", "b"])``."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", requirement)
    assert match, f"pyproject.toml: cannot read the requirement {requirement!r}"
    extras = [e.strip() for e in (match.group(2) or "").split(",") if e.strip()]
    return _normalise(match.group(1)), extras


def _declared(extras: Iterable[str]) -> set[str]:
    """The distributions that the core install plus ``extras`` bring (self-references
    such as ``dwp[cohorts]`` followed)."""
    optional = PROJECT["optional-dependencies"]
    requirements = list(PROJECT["dependencies"])
    for extra in extras:
        assert extra in optional, f"pyproject.toml has no extra {extra!r}"
        requirements += optional[extra]
    names: set[str] = set()
    for requirement in requirements:
        name, nested = _parse(requirement)
        if name == _normalise(PROJECT["name"]):
            names |= _declared(nested)
        else:
            names.add(name)
    return names


def test_every_extra_resolves_and_none_names_torchvision():
    for extra, requirements in PROJECT["optional-dependencies"].items():
        declared = _declared([extra])  # asserts that self-references name real extras
        assert "torchvision" not in declared, f"extra {extra!r}: torchvision"
        assert requirements, f"extra {extra!r} is empty"
    assert _declared(["dev"]) >= _declared(["test"]) >= _declared(["bench"])
    # test: the whole suite runs, and it imports from every package
    assert _declared(["test"]) >= set().union(*(_declared(e) for e in NEEDS.values()))


# ---------------------------------------------------------------------------------------------
# imports


def _third_party_imports(path: Path) -> Iterator[tuple[str, int]]:
    """Absolute imports of ``path`` outside the standard library and this repository, at
    any depth (a deferred import is still a dependency), with line numbers."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in PACKAGES or top in TEST_HELPERS:
                continue
            yield name, node.lineno


def _distribution(import_name: str) -> str:
    parts = import_name.split(".")
    for length in range(len(parts), 0, -1):
        found = DISTRIBUTIONS.get(".".join(parts[:length]))
        if found:
            return found
    raise AssertionError(
        f"{import_name}: unknown import; add its distribution to DISTRIBUTIONS in "
        "tests/test_packaging.py and declare it in pyproject.toml"
    )


def _needs(relative: str) -> tuple[str, ...]:
    key = max((k for k in NEEDS if relative == k or relative.startswith(k + "/")), key=len)
    return NEEDS[key]


@pytest.mark.parametrize("package", [*PACKAGES, "tests"])
def test_every_third_party_import_is_declared(package):
    undeclared = []
    for path in sorted((ROOT / package).rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        extras = _needs(relative)
        declared = _declared(extras)
        for name, line in _third_party_imports(path):
            distribution = _distribution(name)
            if distribution not in declared:
                where = f"dwp[{','.join(extras)}]" if extras else "the core install"
                undeclared.append(f"{relative}:{line} imports {name} ({distribution}): {where}")
    assert not undeclared, "not declared in pyproject.toml:\n" + "\n".join(undeclared)


def _module_paths() -> dict[str, Path]:
    paths = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return paths


def _with_fallback(tree: ast.AST) -> set[int]:
    """The ``id``s of the import statements inside a ``try`` that handles ImportError: the
    module does without them (a warning, a skipped figure), so they need no check."""
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            handler.type is not None
            and {"ImportError", "ModuleNotFoundError"}
            & {n.id for n in ast.walk(handler.type) if isinstance(n, ast.Name)}
            for handler in node.handlers
        ):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return guarded


def _reach(start: str) -> set[str]:
    """The third-party imports reachable from module ``start``: its imports, at any depth,
    followed through the repository's modules (and the packages above each); imports
    with a fallback (:func:`_with_fallback`) are left out."""
    paths = _module_paths()
    seen: set[str] = set()
    found: set[str] = set()
    todo = [start]
    while todo:
        module = todo.pop()
        if module in seen or module not in paths:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages
        path = paths[module]
        package = parts if path.name == "__init__.py" else parts[:-1]
        tree = ast.parse(path.read_text())
        optional = _with_fallback(tree)
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                name = ".".join([*base, node.module] if node.module else base)
                names = [name, *(f"{name}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES:
                    todo.append(name)
                elif top not in sys.stdlib_module_names:
                    found.add(name)
    return found


def _launchers() -> Iterator[tuple[str, str, tuple[str, ...], str]]:
    """(console script, module it runs, modules it checks, extra) of every front."""
    for script, command in benchmarks.entry.COMMANDS.items():
        module = command.target.partition(":")[0]
        yield script, module, command.requires, benchmarks.entry.EXTRA
    module = cohorts.entry.TARGET.partition(":")[0]
    yield "dwp-cohorts", module, cohorts.entry.REQUIRES, cohorts.entry.EXTRA


@pytest.mark.parametrize(
    ("script", "module", "requires", "extra"),
    list(_launchers()),
    ids=[launcher[0] for launcher in _launchers()],
)
def test_a_front_checks_everything_its_command_reaches(script, module, requires, extra):
    core = _declared([])
    checked = {_distribution(name) for name in requires}
    reached = {_distribution(name) for name in _reach(module)}
    unchecked = reached - core - checked - CHECKED_AT_USE
    assert not unchecked, f"{script} reaches {sorted(unchecked)} without checking them first"
    assert checked <= _declared([extra]), f"{script}: dwp[{extra}] lacks what it checks"


def test_unet3d_extra_covers_the_unet3d_command():
    reached = {_distribution(name) for name in _reach("unet3d.cli")}
    assert reached - CHECKED_AT_USE <= _declared(["unet3d"])


# ---------------------------------------------------------------------------------------------
# a core install, simulated: every module that only an extra brings is blocked

#: console script -> (arguments that would do real work, the extra it must name; None: a
#: core command, run only with --version)
WORK = {
    "dwp": (None, None),
    "unet3d": (["predict", "--checkpoint", "c.pt", "--input", "x.nii.gz", "--out", "o"], "unet3d"),
    "dwp-cohorts": (["list"], "cohorts"),
    "dwp-transfer": (["--preset", "ci"], "bench"),
    "dwp-speed": (["--quick"], "bench"),
    "dwp-regression": (["--preset", "ci"], "bench"),
    "dwp-variational": (["--preset", "ci"], "bench"),
}

_CORE_INSTALL = r"""
import contextlib, importlib, io, json, sys

blocked, calls, imports = json.loads(sys.argv[1])
for name in blocked:
    sys.modules[name] = None  # import fails, importlib.util.find_spec answers None

def call(target, argv):
    module, _, function = target.partition(":")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = getattr(importlib.import_module(module), function)(argv)
        except SystemExit as exit:
            code = exit.code
        except BaseException as error:  # would have been a traceback
            code = f"{type(error).__name__}: {error}"
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}

def attempt(module, attribute):
    try:
        value = importlib.import_module(module)
        if attribute:
            getattr(value, attribute)
        return None
    except BaseException as error:
        return [type(error).__name__, isinstance(error, ImportError), str(error)]

print(json.dumps({
    "calls": [call(target, argv) for target, argv in calls],
    "imports": [attempt(module, attribute) for module, attribute in imports],
}))
"""

_IMPORTS = [
    ("unet3d.losses", None),
    ("unet3d.metrics", None),
    ("regression3d", None),
    ("cohorts", None),
    ("cohorts", "generate"),
    ("unet3d", "UNet3D"),
    ("dwp.cli", None),
    ("nifti_io", None),
]


def _calls() -> list[tuple[str, list[str]]]:
    calls = []
    for script, target in PROJECT["scripts"].items():
        work, _ = WORK[script]
        calls.append((target, ["--version"]))
        if work is not None:
            calls.append((target, work))
    calls.append((PROJECT["scripts"]["unet3d"], ["--help"]))
    return calls


@pytest.fixture(scope="module")
def core_install() -> dict:
    core = _declared([])
    blocked = sorted(n for n, d in DISTRIBUTIONS.items() if "." not in n and d not in core)
    payload = json.dumps([blocked, _calls(), _IMPORTS])
    result = subprocess.run(
        [sys.executable, "-c", _CORE_INSTALL, payload],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    out["calls"] = dict(zip([(t, tuple(a)) for t, a in _calls()], out["calls"], strict=True))
    out["imports"] = dict(zip(_IMPORTS, out["imports"], strict=True))
    return out


def test_workloads_cover_every_console_script():
    assert set(WORK) == set(PROJECT["scripts"])


@pytest.mark.parametrize("script", sorted(PROJECT["scripts"]))
def test_core_install_every_console_script_prints_its_version(core_install, script):
    result = core_install["calls"][(PROJECT["scripts"][script], ("--version",))]
    assert result["code"] in (0, None), result
    assert result["stdout"] == f"{script} (dwp {__version__})\n"


@pytest.mark.parametrize("script", sorted(s for s, (work, _) in WORK.items() if work))
def test_core_install_a_command_without_its_extra_says_which_in_one_line(core_install, script):
    work, extra = WORK[script]
    result = core_install["calls"][(PROJECT["scripts"][script], tuple(work))]
    assert result["code"] == 2, result
    lines = result["stderr"].splitlines()
    assert len(lines) == 1, result["stderr"]
    assert lines[0].startswith(f"error: {script} needs "), lines[0]
    assert lines[0].endswith(f'which the core install leaves out: pip install "dwp[{extra}]"')
    assert result["stdout"] == ""


def test_core_install_unet3d_help_works(core_install):
    result = core_install["calls"][(PROJECT["scripts"]["unet3d"], ("--help",))]
    assert result["code"] == 0 and "usage: unet3d" in result["stdout"], result


@pytest.mark.parametrize(
    ("module", "attribute", "extra"),
    [
        ("unet3d.losses", None, "unet3d"),
        ("unet3d.metrics", None, "unet3d"),
        ("regression3d", None, "regression"),
        ("cohorts", "generate", "cohorts"),
    ],
)
def test_core_install_an_import_without_its_extra_names_it(core_install, module, attribute, extra):
    error = core_install["imports"][(module, attribute)]
    assert error is not None, f"{module} imported on a core install"
    kind, is_import_error, message = error
    assert kind == "MissingExtraError" and is_import_error
    assert message.endswith(f'pip install "dwp[{extra}]"'), message


@pytest.mark.parametrize(
    ("module", "attribute"),
    [("cohorts", None), ("unet3d", "UNet3D"), ("dwp.cli", None), ("nifti_io", None)],
)
def test_core_install_imports_what_needs_no_extra(core_install, module, attribute):
    assert core_install["imports"][(module, attribute)] is None


# ---------------------------------------------------------------------------------------------
# --version on every command


def _runnable() -> dict[str, str]:
    """``python -m`` name -> the ``module:main`` it runs, for every ``__main__.py`` and
    every module with an ``if __name__ == "__main__"`` block."""
    runnable = {}
    for module, path in _module_paths().items():
        source = path.read_text()
        if path.name == "__main__.py":
            package = module.rsplit(".", 1)[0]
            tree = ast.parse(source)
            (origin,) = [
                node
                for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and any(a.name == "main" for a in node.names)
            ]
            base = package.split(".")
            if origin.level:
                base = base[: len(base) - origin.level + 1]
                target = ".".join([*base, origin.module] if origin.module else base)
            else:
                target = origin.module
            runnable[package] = f"{target}:main"
        elif '__name__ == "__main__"' in source:
            runnable[module] = f"{module}:main"
    return runnable


@pytest.mark.parametrize(("name", "target"), sorted(_runnable().items()))
def test_every_python_m_script_prints_its_version(name, target, capsys):
    module, _, function = target.partition(":")
    main = getattr(importlib.import_module(module), function)
    try:
        code = main(["--version"])  # a front (dwp.extras.launch) answers and returns
    except SystemExit as exit:  # argparse answers and exits
        code = exit.code
    assert code == 0
    assert capsys.readouterr().out.endswith(f" (dwp {__version__})\n")


def test_every_parser_has_version():
    """A new command line gets ``--version`` too: every module that builds a top-level
    parser adds it (``dwp.extras.add_version_argument``)."""
    missing = [
        path.relative_to(ROOT).as_posix()
        for path in _module_paths().values()
        if "ArgumentParser(" in (source := path.read_text())
        and "add_version_argument(" not in source
        and '"--version"' not in source
    ]
    assert not missing, f"no --version: {missing}"


# ---------------------------------------------------------------------------------------------
# dwp.extras


def test_require_names_the_extra_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "monai", None)  # as if MONAI were not installed
    with pytest.raises(MissingExtraError) as caught:
        require("numpy", "monai", extra="unet3d", needed_by="unet3d")
    message = str(caught.value)
    assert message == (
        'unet3d needs MONAI, which the core install leaves out: pip install "dwp[unet3d]"'
    )
    assert "\n" not in message
    assert isinstance(caught.value, ModuleNotFoundError)
    assert caught.value.name == "monai" and caught.value.extra == "unet3d"
    require("numpy", "torch", extra="unet3d", needed_by="unet3d")  # installed: no error


def test_is_installed_imports_nothing(monkeypatch):
    assert not is_installed("no_such_module_for_dwp")
    assert not is_installed("no_such_module_for_dwp.child")
    monkeypatch.setitem(sys.modules, "numpy", None)
    assert not is_installed("numpy")
    monkeypatch.delitem(sys.modules, "json", raising=False)
    assert is_installed("json") and "json" not in sys.modules


def test_from_extra_translates_only_a_module_that_is_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "monai", None)
    with pytest.raises(MissingExtraError, match=r'pip install "dwp\[regression\]"') as caught:
        with from_extra("regression", needed_by="regression3d"):
            import monai  # noqa: F401  (a submodule import could hit sys.modules' cache)
    assert isinstance(caught.value.__cause__, ModuleNotFoundError)
    # a missing piece of an installed package is a bug or a broken install: unchanged
    with pytest.raises(ModuleNotFoundError) as caught:
        with from_extra("plot", needed_by="test"):
            import json.no_such_submodule  # noqa: F401
    assert type(caught.value) is ModuleNotFoundError
    with pytest.raises(ValueError, match="other"), from_extra("plot", needed_by="test"):
        raise ValueError("other")


def test_missing_extra_error_survives_pickling():
    """A benchmark's worker process may send it back to its parent."""
    error = MissingExtraError("nilearn", extra="cohorts", needed_by="cohorts")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is MissingExtraError and str(again) == str(error)
    assert (again.name, again.extra, again.needed_by) == ("nilearn", "cohorts", "cohorts")


def test_exit_on_missing_extra_prints_one_line(capsys):
    @exit_on_missing_extra
    def main(argv: list[str]) -> int:
        """A command."""
        if argv:
            raise MissingExtraError("scipy", extra="bench", needed_by="dwp-x")
        return 0

    assert main([]) == 0 and main.__doc__ == "A command."
    assert main(["go"]) == EXIT_MISSING_EXTRA == 2
    err = capsys.readouterr().err
    assert (
        err
        == 'error: dwp-x needs SciPy, which the core install leaves out: pip install "dwp[bench]"\n'
    )


def test_launch_checks_before_importing(monkeypatch, capsys):
    # --version is answered without importing the target (which does not exist here)
    assert (
        launch(
            "no_such_module_for_dwp:main", prog="dwp-x", requires=(), extra="x", argv=["--version"]
        )
        == 0
    )
    assert capsys.readouterr().out == f"dwp-x (dwp {__version__})\n"
    monkeypatch.setitem(sys.modules, "monai", None)
    code = launch(
        "no_such_module_for_dwp:main",
        prog="dwp-x",
        requires=("monai",),
        extra="bench",
        argv=["--seed", "1"],
    )
    assert code == 2
    assert capsys.readouterr().err.startswith("error: dwp-x needs MONAI")
    # installed: the target is imported now and runs with the arguments
    seen: list[list[str]] = []
    command = types.ModuleType("dwp_test_command")
    command.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "dwp_test_command", command)
    code = launch(
        "dwp_test_command:main", prog="dwp-x", requires=("numpy",), extra="x", argv=["-v"]
    )
    assert code == 7 and seen == [["-v"]]


def test_add_version_argument_prints_prog_and_version(capsys):
    parser = add_version_argument(argparse.ArgumentParser(prog="dwp-x"))
    with pytest.raises(SystemExit) as exit:
        parser.parse_args(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"dwp-x (dwp {__version__})\n"


# ---------------------------------------------------------------------------------------------
# license, type markers, version, constraints, README


def test_license_is_an_spdx_expression_with_its_text():
    assert PROJECT["license"] == "Apache-2.0"  # a string (PEP 639), not a table
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n")
    assert "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert "Copyright 2026 The dwp authors" in text
    # setuptools writes License-Expression from 77 on; older ones reject the string
    assert any(
        re.fullmatch(r"setuptools\s*>=\s*(\d+).*", requirement)
        and int(re.fullmatch(r"setuptools\s*>=\s*(\d+).*", requirement).group(1)) >= 77
        for requirement in PYPROJECT["build-system"]["requires"]
    )


def test_installed_metadata_matches_pyproject():
    """What pip installed: fails on an install older than pyproject.toml (``pip install -e .``
    again), and in CI's fresh install if the build drops the license or a console script."""
    metadata = importlib.metadata.metadata("dwp")
    assert metadata["Version"] == __version__
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in (metadata.get_all("License-File") or [])
    scripts = {
        entry.name: entry.value
        for entry in importlib.metadata.distribution("dwp").entry_points
        if entry.group == "console_scripts"
    }
    assert scripts == PROJECT["scripts"]
    assert set(metadata.get_all("Provides-Extra")) == set(PROJECT["optional-dependencies"])


@pytest.mark.parametrize("package", PACKAGES)
def test_py_typed_ships_with_every_package(package):
    assert (ROOT / package / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["*"]


def test_one_version_source():
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "dwp._version.__version__"
    written = [
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if re.search(r"^__version__\s*=", path.read_text(), re.M)
    ]
    assert written == ["dwp/_version.py"]


def test_constraints_pin_a_complete_set_for_the_benchmarks():
    lines = [
        line.strip()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert all("==" in line for line in lines), "every line pins one version"
    pins = dict(line.split("==", 1) for line in lines)
    names = {_normalise(name) for name in pins}
    assert pins.get("torch") == "2.13.0"
    assert _normalise(PROJECT["name"]) not in names, "the project itself is not pinned"
    assert _declared(["dev"]) <= names, "a pin for every dependency of dwp[dev]"


def test_readme_install_lists_every_extra_and_the_constraints():
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Install\n(.*?)(?=^## )", readme, re.S | re.M).group(1)
    rows = re.findall(r"^\| `([a-z0-9]+)` \|", section, re.M)
    assert rows == list(PROJECT["optional-dependencies"]), "one table row per extra, in order"
    assert "-c constraints.txt" in section

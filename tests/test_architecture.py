"""The codebase's shape, checked: which way imports point, no import cycle in dwp, small
modules, and one owner for each kind of file access (ARCHITECTURE.md says why)."""

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dwp", "unet3d", "regression3d", "cohorts", "nifti_io", "benchmarks")

#: package -> the first-party packages it may import (dependencies point one way:
#: benchmarks -> applications -> dwp; cohorts and nifti_io beside the applications)
ALLOWED = {
    "dwp": set(),
    "nifti_io": {"dwp"},
    "cohorts": {"dwp", "nifti_io"},
    "unet3d": {"dwp", "nifti_io"},
    "regression3d": {"dwp", "nifti_io"},
    "benchmarks": {"dwp", "nifti_io", "cohorts", "unet3d", "regression3d"},
}
MAX_LINES = 600
#: the benchmark packages were split so that a module fits on a few screens
MAX_BENCHMARK_LINES = 450


def _modules(package: str) -> Iterator[Path]:
    yield from sorted((ROOT / package).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module_level_only: bool) -> Iterator[tuple[str, int]]:
    """Absolute names of the modules ``path`` imports, with line numbers.

    ``module_level_only``: only imports run at import time (not inside functions, not
    under ``if TYPE_CHECKING:``).
    """
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]

    def visit(nodes: list[ast.stmt]) -> Iterator[ast.stmt]:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node
            elif module_level_only and isinstance(node, ast.If):
                guard = ast.unparse(node.test)
                if "TYPE_CHECKING" not in guard:
                    yield from visit(node.body)
                    yield from visit(node.orelse)
            elif module_level_only and isinstance(node, (ast.Try, ast.With)):
                yield from visit(node.body)
            elif module_level_only and isinstance(node, ast.ClassDef):
                yield from visit(node.body)

    nodes = visit(tree.body) if module_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            yield name, node.lineno
            for alias in node.names:  # "from . import x" imports the submodule x
                yield f"{name}.{alias.name}", node.lineno


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_point_one_way(package):
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in _modules(package)
        for name, line in _imports(path, module_level_only=False)
        if name.split(".")[0] in PACKAGES and name.split(".")[0] not in ALLOWED[package] | {package}
    ]
    assert not wrong, "\n".join(wrong)


def test_dwp_has_no_import_cycle_and_no_deferred_imports_of_itself():
    modules = {_module_name(p): p for p in _modules("dwp")}
    graph = {
        name: {
            imported
            for imported, _ in _imports(path, module_level_only=True)
            if imported in modules and imported != name
        }
        for name, path in modules.items()
    }
    # a package __init__ is imported before its submodules: an edge to it is real
    state: dict[str, int] = {}

    def cycle_from(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*trail, node, nxt]
            if nxt not in state and (found := cycle_from(nxt, [*trail, node])):
                return found
        state[node] = 2
        return None

    # the package root re-exports everything; cycles through it are import-order facts
    for start in sorted(n for n in graph if n != "dwp"):
        if start not in state:
            found = cycle_from(start, [])
            assert found is None, " -> ".join(found)
    deferred = [
        f"{path.relative_to(ROOT)}:{node.lineno} imports dwp inside {function.name}()"
        for path in modules.values()
        for function in ast.walk(ast.parse(path.read_text()))
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(function)
        if isinstance(node, ast.ImportFrom) and (node.level or node.module.startswith("dwp"))
    ]
    assert not deferred, "\n".join(deferred)


def test_modules_stay_small():
    sizes = {
        path.relative_to(ROOT): len(path.read_text().splitlines())
        for package in PACKAGES
        for path in _modules(package)
    }
    too_big = {p: n for p, n in sizes.items() if n > MAX_LINES}
    assert not too_big, too_big
    benchmark_packages = ("benchmarks/transfer", "benchmarks/speed", "benchmarks/regression")
    big_benchmarks = {
        p: n
        for p, n in sizes.items()
        if str(p).startswith(benchmark_packages) and n > MAX_BENCHMARK_LINES
    }
    assert not big_benchmarks, big_benchmarks


@pytest.mark.parametrize(
    ("call", "owner"),
    [
        ("torch.load", "dwp/io.py"),  # every library file is read with a named error
        ("os.replace", "dwp/io.py"),  # every file is written atomically, one way
        ("mkstemp", "dwp/io.py"),
    ],
)
def test_one_module_owns_each_kind_of_file_access(call, owner):
    users = sorted(
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in _modules(package)
        if any(
            isinstance(node, ast.Call) and ast.unparse(node.func).endswith(call)
            for node in ast.walk(ast.parse(path.read_text()))
        )
    )
    assert users == [owner]

"""No import loops among lenalign's modules: every import statement counts, at module
level or inside a function or an ``if TYPE_CHECKING:`` block, since each is an edge a
reader (and a type checker) follows."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the folders that make up the package, as pyproject.toml maps them
PACKAGE_DIRS = {"lenalign": ROOT / "lenalign", "lenalign.kernels": ROOT / "kernels"}


def package_modules() -> dict[str, tuple[Path, bool]]:
    """{dotted name: (file, is a package's __init__)} for every module of lenalign."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            modules[".".join((package, *parts[: -1 if is_package else None]))] = (
                path,
                is_package,
            )
    return modules


def import_graph(modules: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """{module: the lenalign modules its import statements name}. ``from X import y``
    points at X.y where that is a module, else at X."""
    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    source = f"{base}.{source}" if source else base
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    targets.add(full if full in modules else source)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, then "done"
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_graph_sees_every_module_and_the_imports_between_them():
    graph = import_graph(package_modules())
    assert {"lenalign", "lenalign.api", "lenalign.kernels.forward"} <= graph.keys()
    assert "lenalign.integrations.trl.trainer" in graph
    assert "lenalign.api" in graph["lenalign"]  # from .api import ...
    assert "lenalign.kernels.forward" in graph["lenalign.kernels"]
    assert "lenalign.checks" in graph["lenalign.integrations.trl.config"]  # from ...checks
    # the detector finds a loop where there is one
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_loops():
    cycle = find_cycle(import_graph(package_modules()))
    assert cycle is None, " -> ".join(cycle)

"""No import cycles among the project's own modules (mirror/ and bench/).

A cycle works until someone moves an import to the top of a module or imports the other
end first, and then fails with a half-initialised module; the house style forbids them, so
this checks the whole tree instead of trusting review. Every import counts, at the top of
a module or inside a function: a function-level import only postpones the cycle to the
call. Read from the source with ast, nothing is imported here."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mirror", "bench")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imported_names(name: str, path: Path, modules=frozenset()) -> set[str]:
    """Every dotted name `name` imports, relative imports made absolute. For `from X
    import y`: X.y when y is a submodule (one of `modules`; X itself then only runs as
    its parent package), else X (y is a name X defines)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.add(sub if sub in modules else source)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports. An import of a.b.c points at the
    deepest of a.b.c, a.b, a that is a module of the project; the parent packages a
    submodule import also runs are left out: every submodule would otherwise point at its
    package, and a package's __init__ importing any of its submodules would count as a
    cycle."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for dotted in imported_names(name, path, modules):
            parts = dotted.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts and ".".join(parts) != name:
                edges.add(".".join(parts))
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that starts and ends at the same module, or None."""
    state: dict[str, str] = {}          # "open" on the current path, "done" once cleared
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


@pytest.mark.unit
def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.unit
def test_the_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "bench.workloads" in graph["bench.runner"]         # from . import ..., workloads
    assert "mirror.bpfprog" in graph["bench.configs"]         # inside Shared.__init__ too
    assert "mirror.errors" in graph["mirror.lab.demo"]            # from ..errors import
    assert "mirror.capture.flow" in graph["mirror.lab.demo"]      # from ..capture.pcap
    assert "mirror.capture.index" in graph["mirror.capture.command"]   # from .index


@pytest.mark.unit
def test_no_import_cycle_in_mirror_and_bench():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)

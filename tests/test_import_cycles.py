"""No import cycles inside ``attnlab``: the import graph of ``src/attnlab``, read with ``ast``, is acyclic.

Every ``import`` / ``from ... import`` statement counts, wherever it is: at module level and inside
functions or methods alike (a function-level import is a lazy edge, but still an edge: two modules that
need each other are one module in two files). Only imports under ``if TYPE_CHECKING:`` are left out,
since they never run. An edge goes to the module named: ``from attnlab.bench import speed`` is an
edge to ``attnlab.bench.speed``, ``from attnlab.ops import softmax_attention`` one to ``attnlab.ops``
(the package's ``__init__``). The implicit import of parent packages is not an edge (every module
would otherwise form a cycle with ``attnlab/__init__.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file for every ``.py`` file of ``package`` under ``root``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of ``tree`` with whether it sits inside a function (lazy) or not."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking_block(child):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append((child, in_function))
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(tree, False)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, str]]:
    """module -> {imported module: "module-level" or "function-level" (module-level wins)}."""
    graph: dict[str, dict[str, str]] = {name: {} for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node, lazy in _imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join([*package, base] if base else package)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                while target and target not in modules:  # `import attnlab.ops.x.y` names the module attnlab.ops.x
                    target = target.rpartition(".")[0]
                if not target or target == name:
                    continue
                kind = "function-level" if lazy else "module-level"
                if graph[name].get(target) != "module-level":
                    graph[name][target] = kind
    return graph


def find_cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle (as a closed path of module names) per strongly connected component of the graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_in(graph, set(component)) for component in components]


def _cycle_in(graph: dict[str, dict[str, str]], component: set[str]) -> list[str]:
    """A shortest closed path through the component's first module (breadth-first inside the component)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt in component and nxt not in parents and nxt != start:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def describe(graph: dict[str, dict[str, str]], cycle: list[str]) -> str:
    return " -> ".join(f"{a} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)) + f" -> {cycle[-1]}"


def test_attnlab_has_no_import_cycles() -> None:
    modules = module_files(SRC, "attnlab")
    assert len(modules) > 50 and "attnlab.bench.speed" in modules  # the walk found the package
    graph = import_graph(modules)
    assert "attnlab.registry" in graph["attnlab"]  # and its edges
    cycles = find_cycles(graph)
    assert not cycles, "import cycles inside attnlab:\n" + "\n".join(describe(graph, c) for c in cycles)


@pytest.mark.parametrize("lazy", [False, True], ids=["module-level", "function-level"])
def test_the_walk_finds_a_cycle_and_names_it(tmp_path: Path, lazy: bool) -> None:
    """The detector on a small package with a known cycle a -> b -> c -> a (plus an acyclic side branch)."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.c import value\n")
    (package / "a.py").write_text("from pkg import b\nimport os\n")
    (package / "b.py").write_text("from .sub import c\n")
    closing = "def f():\n    from pkg.a import x\n" if lazy else "import pkg.a\n"
    (package / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.d\n"
                                          + closing)
    (package / "d.py").write_text("import pkg.a\n")  # d -> a, but c -> d only under TYPE_CHECKING: no cycle
    modules = module_files(tmp_path, "pkg")
    graph = import_graph(modules)
    assert graph["pkg.b"] == {"pkg.sub.c": "module-level"}
    assert graph["pkg.sub.c"] == {"pkg.a": "function-level" if lazy else "module-level"}
    cycles = find_cycles(graph)
    assert cycles == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    text = describe(graph, cycles[0])
    assert text.startswith("pkg.a (module-level) -> pkg.b (module-level) -> pkg.sub.c")
    assert ("(function-level)" in text) == lazy
    (package / "sub" / "c.py").write_text("value = 1\n")  # break the cycle
    assert find_cycles(import_graph(module_files(tmp_path, "pkg"))) == []

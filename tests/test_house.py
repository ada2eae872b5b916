"""The package's layering, read from the source: framework modules never import the built-in engines or the
command line, no module imports another module's private names, and the import graph has no circles (imports
inside functions included: a circle closed by a deferred import is still a circle)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORK = ROOT / "graphflow"
ENGINES = ROOT / "engines"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "engines":
        parts[0:1] = ["graphflow", "engines"]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    files = [*FRAMEWORK.rglob("*.py"), *ENGINES.rglob("*.py")]
    return {module_name(p): p for p in files}


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names imported from it, line) for every import statement of a file, relative ones resolved."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.append((base, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((a.name, [], node.lineno) for a in node.names)
    return found


def edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the modules of the package it imports (a `from package import submodule` counts as both)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, path in modules.items():
        for base, names, _ in imports(path):
            targets = [base] + [f"{base}.{n}" for n in names]
            graph[m].update(t for t in targets if t in modules and t != m)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_circles():
    assert cycles(edges(sources())) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_framework_modules_import_neither_the_engines_nor_the_command_line():
    bad = []
    for m, path in sources().items():
        if m.startswith(("graphflow.engines", "graphflow.cli")) or m == "graphflow.__main__":
            continue
        for base, names, line in imports(path):
            targets = [base] + [f"{base}.{n}" for n in names]
            if any(t.startswith(("graphflow.engines", "graphflow.cli")) for t in targets):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {base}")
    assert bad == []


def test_no_module_imports_a_private_name_of_another():
    bad = []
    files = [*sources().values(), *(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py"),
             *(ROOT / "tools").glob("*.py")]
    for path in files:
        for base, names, line in imports(path):
            if not base.startswith("graphflow"):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private or any(part.startswith("_") and not part.startswith("__") for part in base.split(".")):
                bad.append(f"{path.relative_to(ROOT)}:{line} from {base} import {', '.join(private) or '…'}")
    assert bad == []

"""The package's import graph: no cycles, and no imports hidden inside functions.

Read from the source with ``ast`` (nothing is imported), so a cycle cannot hide behind an import
placed inside a function: every import of a package module counts, wherever it stands.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "python" / "cutlass_moe"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))

#: Third-party modules that may be imported inside a function: heavy, optional dependencies
#: deferred on purpose (each such import carries a comment saying so).
DEFERRED_OPTIONAL = {"matplotlib", "tqdm", "torch.profiler", "torch.autograd"}


def _package_imports(node: ast.AST, module: str) -> set[str]:
    """Package modules named by one import statement of ``module``."""
    found = set()
    if isinstance(node, ast.ImportFrom):
        if node.level == 1 or node.module == "cutlass_moe" or (
                node.module or "").startswith("cutlass_moe."):
            base = node.module or ""
            base = base.removeprefix("cutlass_moe").lstrip(".") if node.level == 0 else base
            if base:
                found.add(base.split(".")[0])
            else:
                found.update(a.name for a in node.names if a.name in MODULES)
    elif isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.startswith("cutlass_moe."):
                found.add(alias.name.split(".")[1])
    return found - {module}


def _imports(module: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(package modules imported anywhere in ``module``, imports inside functions as
    ``(line, imported name)``)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    edges: set[str] = set()
    nested: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                       ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                edges.update(_package_imports(child, module))
                if in_function:
                    names = ([child.module or "."] if isinstance(child, ast.ImportFrom)
                             else [a.name for a in child.names])
                    if isinstance(child, ast.ImportFrom) and child.level:
                        names = ["cutlass_moe." + (child.module or "")]
                    nested.extend((child.lineno, name) for name in names)
            visit(child, inside)

    visit(tree, False)
    return edges, nested


GRAPH = {module: _imports(module)[0] for module in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = walk(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = walk(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_import_reader_sees_every_form(tmp_path, monkeypatch):
    source = (
        "from . import ops, _ext\n"
        "from .tactics import candidates\n"
        "import cutlass_moe.bench\n"
        "from cutlass_moe import cli\n"
        "def f():\n"
        "    from .demo import main\n"
        "    import tqdm\n"
    )
    monkeypatch.setattr(pathlib.Path, "read_text", lambda self: source)
    edges, nested = _imports("probe")
    assert edges == {"ops", "_ext", "tactics", "bench", "cli", "demo"}
    assert nested == [(6, "cutlass_moe.demo"), (7, "tqdm")]


def test_no_import_cycles():
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("module", MODULES)
def test_no_imports_inside_functions(module):
    """Package modules are imported at the top; only heavy optional dependencies may be
    deferred into the function that needs them."""
    _, nested = _imports(module)
    unexpected = [(line, name) for line, name in nested
                  if name.startswith("cutlass_moe")
                  or name.split(".")[0] not in {n.split(".")[0] for n in DEFERRED_OPTIONAL}]
    assert unexpected == [], f"{module}.py imports inside functions: {unexpected}"


def test_layers():
    """The lower layers never import the upper ones (what each module may see)."""
    upper = {"cli", "bench", "demo", "ops", "autotuner"}
    for low in ("activation", "_ext", "tactics", "timing", "validation", "tuning_cache",
                "quantization", "reference", "presets", "weights", "tables"):
        if low in GRAPH:
            assert not GRAPH[low] & upper, f"{low} imports {GRAPH[low] & upper}"
    for module in MODULES:
        if module not in ("cli", "__main__"):
            assert "cli" not in GRAPH[module], f"{module} imports the command line"

"""The package's import graph: no cycles, and no imports hidden inside functions.

Read from the source with ``ast`` (nothing is imported), so a cycle cannot hide behind an import
placed inside a function: every import of a package module counts, wherever it stands.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "python" / "cutlass_moe"


def _discover() -> list[str]:
    """Modules by dotted name within the package: ``ops``, ``__init__`` (the package's own),
    and for a subpackage ``integrations`` (its ``__init__.py``) and ``integrations.name``."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if len(parts) > 1 and parts[-1] == "__init__":
            parts.pop()
        found.append(".".join(parts))
    return sorted(found)


MODULES = _discover()


def _is_package(module: str) -> bool:
    return (PACKAGE / module.replace(".", "/")).is_dir()


def _source(module: str) -> pathlib.Path:
    if _is_package(module):
        return PACKAGE / module.replace(".", "/") / "__init__.py"
    return PACKAGE / f"{module.replace('.', '/')}.py"


def _module_of(parts: list[str]) -> str | None:
    """The package module that a dotted path within the package names (its longest prefix
    that is a module), or None."""
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in MODULES:
            return name
    return None

#: Third-party modules that may be imported inside a function: heavy, optional dependencies
#: deferred on purpose (each such import carries a comment saying so).
DEFERRED_OPTIONAL = {"matplotlib", "tqdm", "torch.profiler", "torch.autograd"}


def _package_imports(node: ast.AST, module: str) -> set[str]:
    """Package modules named by one import statement of ``module`` (relative imports are
    resolved from the package that holds ``module``)."""
    found: set[str | None] = set()
    if isinstance(node, ast.ImportFrom):
        if node.level:
            package = module.split(".") if _is_package(module) else module.split(".")[:-1]
            if node.level - 1 > len(package):
                return set()
            base = package[:len(package) - (node.level - 1)]
        elif node.module == "cutlass_moe" or (node.module or "").startswith("cutlass_moe."):
            inner = node.module.removeprefix("cutlass_moe").lstrip(".")
            base = inner.split(".") if inner else []
        else:
            return set()
        if node.level and node.module:
            base = base + node.module.split(".")
        if base and (node.level == 0 or node.module):
            target = _module_of(base)
            found.add(target)
            if target is not None and _is_package(target):  # from .pkg import submodule
                found.update(_module_of(base + [a.name]) for a in node.names)
        else:
            found.update(_module_of(base + [a.name]) for a in node.names)
    elif isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.startswith("cutlass_moe."):
                found.add(_module_of(alias.name.split(".")[1:]))
    return {name for name in found if name is not None} - {module}


def _imports(module: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(package modules imported anywhere in ``module``, imports inside functions as
    ``(line, imported name)``)."""
    tree = ast.parse(_source(module).read_text())
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
    # Integrations (cutlass_moe.integrations.*) are opt-in: nothing outside them imports them.
    for module in MODULES:
        if not module.startswith("integrations"):
            assert not {m for m in GRAPH[module] if m.startswith("integrations")}, (
                f"{module} imports an integration")


def test_subpackages_are_read():
    """The import graph covers subpackages, with their relative imports resolved."""
    assert "integrations" in MODULES and "integrations.transformers" in MODULES
    assert {"ops", "validation", "_ext"} <= GRAPH["integrations.transformers"]

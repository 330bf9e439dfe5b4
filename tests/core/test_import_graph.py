"""The package's import graph has no cycles, imports made inside functions included.

The graph is read from the installed package's source with :mod:`ast` (nothing is imported but
``sparsecore`` itself, to find its folders): every ``import``/``from ... import`` anywhere in a
module, at the top, inside a function or under ``try``, is an edge. Imports under
``if TYPE_CHECKING:`` are left out: they never run, so they tie no modules at run time.

A cycle, even one closed by an import inside a function, means two modules cannot be read,
tested or moved one without the other; this test keeps the package free of them.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

#: The packages of the distribution (``pyproject.toml`` maps each onto its own folder).
PACKAGES = (
    "sparsecore",
    "sparsecore.torch",
    "sparsecore.keras",
    "sparsecore.cupy",
    "sparsecore.kernels",
)


def package_modules() -> dict[str, Path]:
    """Every module of the installed distribution: dotted name -> source file."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue  # an optional package absent from this installation
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules.setdefault(".".join([package, *parts]), path)
    return modules


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """All nodes of ``tree`` except those under ``if TYPE_CHECKING:``."""
    out: list[ast.AST] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        out.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that module ``name`` (file ``path``) imports, anywhere in it."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                # ``from pkg import module`` imports the module; ``from mod import name`` the mod
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return {target for target in found if target in modules and target != name}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    return "\n".join(f"  {m} -> {', '.join(sorted(graph[m] & members))}" for m in component)


def test_the_graph_is_read():
    graph = import_graph()
    # a graph that misses the package, its subpackages or the imports inside functions would
    # pass the cycle test below for nothing
    assert "sparsecore.engine" in graph and "sparsecore.torch.adapter" in graph
    assert "sparsecore.kernels" in graph and "sparsecore.keras.callback" in graph
    assert "sparsecore.config" in graph["sparsecore.engine"]  # a top-level import
    assert "sparsecore.engine" in graph["sparsecore"]  # a relative import in an __init__


def test_imports_inside_functions_count(tmp_path):
    modules = {
        "pkg": tmp_path / "__init__.py",
        "pkg.a": tmp_path / "a.py",
        "pkg.b": tmp_path / "b.py",
    }
    modules["pkg.a"].write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from . import b\n"
        "def f():\n    from .b import g\n    return g\n"
    )
    modules["pkg.b"].write_text("if TYPE_CHECKING:\n    from .a import f\n")
    assert imports_of("pkg.a", modules["pkg.a"], modules) == {"pkg.b"}
    assert imports_of("pkg.b", modules["pkg.b"], modules) == set()
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles in the package:\n" + "\n\n".join(
        describe(c, graph) for c in found
    )

"""The layering of ARCHITECTURE.md holds: no import circles among the package modules, and the model
library (``bus_model``) imports nothing of the training application (``bus_model.training``).

Imports are read statically from the source (``import x``, ``from .x import y``, anywhere in a file,
function bodies included: the circles this guards against ran through imports inside ``main``);
imports under ``if TYPE_CHECKING:`` never run and are left out. The ``bus`` CLI imports its subcommand
modules by name (``SUBCOMMANDS``), so those edges are added from the table.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"bus_kernels": "bus_kernels", "bus_model": "bus_model", "bus_benchmarks": "benchmarks"}


def package_modules() -> dict[str, str]:
    """{dotted module name: file path} of every module of the three packages (``__init__`` as the package)."""
    modules = {}
    for package, folder in PACKAGES.items():
        root = os.path.join(REPO, folder)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and os.path.isfile(os.path.join(dirpath, d, "__init__.py"))]
            rel = os.path.relpath(dirpath, root)
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for name in filenames:
                if name.endswith(".py"):
                    modules[prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"] = os.path.join(dirpath, name)
    return modules


def _runtime_nodes(tree: ast.AST):
    """Every node, skipping the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(module: str, path: str, known: set[str]) -> set[str]:
    """The package modules ``module`` imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    is_package = os.path.basename(path) == "__init__.py"
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    found = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module defining it
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ``import pkg.sub.mod`` of a module outside the packages
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    graph = {m: imports_of(m, p, known) for m, p in modules.items()}
    from bus_model.training.cli import SUBCOMMANDS

    graph["bus_model.training.cli"] |= {c.module for c in SUBCOMMANDS.values() if c.module in known}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components with more than one module, or a self-loop."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(root):
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    out.append(sorted(component))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return out


def test_cycle_finder_finds_cycles():
    """The checker itself: it must see a planted circle, a self-loop, and no circle in a chain."""
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"a"}}) == [["a"]]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    two = strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c", "a"}})
    assert sorted(two) == [["a", "b"], ["c", "d"]]


def test_import_reader_resolves_relative_and_lazy_imports(tmp_path):
    """``from . import x`` in a module, ``from ..y import z`` of a name, and an import inside a
    function body all become edges; a TYPE_CHECKING import does not."""
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "from ..lib import thing\n"
        "if TYPE_CHECKING:\n"
        "    from .hidden import T\n"
        "def main():\n"
        "    from .cli import run\n"
    )
    known = {"p", "p.sub", "p.sub.m", "p.sub.sibling", "p.sub.cli", "p.sub.hidden", "p.lib"}
    assert imports_of("p.sub.m", str(src), known) == {"p.sub.sibling", "p.lib", "p.sub.cli"}


def test_no_import_cycles():
    cycles = strongly_connected(import_graph())
    assert cycles == [], "import circles (break them with a module both sides import):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_library_imports_nothing_of_the_training_application():
    graph = import_graph()
    library = [m for m in graph if m.startswith("bus_model") and not m.startswith("bus_model.training")]
    assert "bus_model.model" in library and "bus_model.data" in library
    bad = {m: sorted(t for t in graph[m] if t.startswith("bus_model.training")) for m in library}
    assert not any(bad.values()), f"library modules importing bus_model.training: { {k: v for k, v in bad.items() if v} }"
    kernels = {m: sorted(t for t in graph[m] if not t.startswith("bus_kernels")) for m in graph if m.startswith("bus_kernels")}
    assert not any(kernels.values()), f"bus_kernels importing the layers above it: { {k: v for k, v in kernels.items() if v} }"


@pytest.mark.parametrize("probe", ["bus_model", "bus_model.model", "bus_model.data"])
def test_importing_the_library_loads_no_training_module(probe):
    library = sorted(m for m in package_modules() if m.startswith("bus_model") and not m.startswith("bus_model.training"))
    code = (
        "import importlib, sys\n"
        f"importlib.import_module({probe!r})\n"
        f"for name in {library!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('bus_model.training')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


MAX_LINES = 500  # issue 11: small files with one concern (ARCHITECTURE.md)


def test_no_module_is_over_the_size_limit():
    sizes = {}
    for module, path in package_modules().items():
        with open(path, encoding="utf-8") as f:
            sizes[module] = sum(1 for _ in f)
    assert len(sizes) > 50
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}, f"split modules over {MAX_LINES} lines"

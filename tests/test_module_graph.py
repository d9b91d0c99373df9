"""No import cycles in mlxq, lazy (function-level) imports included, and every module
imports on its own in a fresh interpreter."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mlxq"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, known) -> set[str]:
    """mlxq modules ``name`` imports anywhere in its text (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            # The longest known module the name refers to (``from . import x`` -> mlxq.x).
            while t and t not in known:
                t = t.rpartition(".")[0]
            # A package's own __init__ always runs first; importing a parent is not a cycle.
            if t and t != name and not name.startswith(t + "."):
                found.add(t)
    return found


def _cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_loading_modules_have_one_direction():
    """Folder resolution and sources never reach back to loading or the default model."""
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for m in graph[todo.pop()] - seen:
                seen.add(m)
                todo.append(m)
        return seen

    for low in ("mlxq.model_folder", "mlxq.sources", "mlxq.convert", "mlxq.output_files"):
        assert not reach(low) & {"mlxq.loading", "mlxq.default_model"}, low


@pytest.mark.parametrize("module", ["mlxq.model_folder", "mlxq.sources", "mlxq.convert",
                                    "mlxq.default_model", "mlxq.loading", "mlxq.output_files",
                                    "mlxq.weight_check"])
def test_module_imports_alone(module):
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, timeout=120)

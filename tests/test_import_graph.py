"""The project's import graph: no cycle among its packages' modules, and the kernel library
(fused_loss) depends on nothing of the integration, the benchmarks, the tests or torchtitan.
Read from the sources with `ast` (imports inside functions count: they are dependencies too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fused_loss", "parallel", "benchmarks")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    files = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else ():
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def imported_names(path: Path, module: str) -> set[str]:
    """Every absolute module name `path` imports, relative imports resolved; for
    `from a import b` both a and a.b (the caller keeps the ones that are modules)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports. Its own packages are left out: importing a
    module runs its parents' __init__ first anyway (`from . import x` is not a cycle)."""
    return {m: {n for n in imported_names(p, m)
                if n in files and n != m and not m.startswith(n + ".")}
            for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_relative_imports_resolve(tmp_path):
    pkg = tmp_path / "fused_loss"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .api import thing\n")
    (pkg / "api.py").write_text("from . import plan\nfrom .options import X\n")
    (pkg / "plan.py").write_text("import torch\n")
    (pkg / "options.py").write_text("from fused_loss.api import thing\n")
    graph = import_graph(module_files(tmp_path))
    assert graph["fused_loss"] == {"fused_loss.api"}
    assert graph["fused_loss.api"] == {"fused_loss.plan", "fused_loss.options"}
    assert find_cycle(graph) == ["fused_loss.api", "fused_loss.options", "fused_loss.api"]


def test_the_project_imports_form_no_cycle():
    cycle = find_cycle(import_graph(module_files()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_kernel_library_imports_nothing_of_the_rest():
    outside = ("parallel", "benchmarks", "tests", "torchtitan")
    for module, path in module_files().items():
        if module.split(".")[0] != "fused_loss":
            continue
        bad = sorted(n for n in imported_names(path, module) if n.split(".")[0] in outside)
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"

"""Structure rules of the package, checked on its source: short functions, no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "sats"
MAX_LINES = 80


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(SRC.glob("*.py"))}


def test_no_function_is_longer_than_80_lines() -> None:
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, long


def _imports(tree: ast.Module, known: set[str]) -> set[str]:
    """sats modules a module imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] == "sats" and len(parts) > 1:
                out.add(parts[1])
            elif node.module == "sats":
                out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("sats.")}
    return out & known


def test_no_import_cycles_between_modules() -> None:
    modules = _modules()
    graph = {m: _imports(t, set(modules)) - {m} for m, t in modules.items()}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen

    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in reachable(b)})
    assert not cycles, f"modules importing each other (directly or through others): {cycles}"


def test_the_checks_see_the_package() -> None:
    # Guards the two tests above against passing on an empty or wrong folder.
    modules = _modules()
    assert {"training", "inference", "run", "io", "dicom"} <= set(modules)
    assert "run" in _imports(modules["inference"], set(modules))

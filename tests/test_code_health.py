"""Structure rules of the package, checked on its source: short functions, no import cycles,
one home for the mid-sagittal plane, and prediction free of the test-bed generator."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 80


def _modules() -> dict[str, ast.Module]:
    """Every module of the package by dotted name (``sats.predict.inference``), packages' ``__init__`` included."""
    out = {}
    for p in sorted((SRC / "sats").rglob("*.py")):
        parts = p.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(p.read_text())
    return out


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
    """sats modules a module imports, at module level or inside functions (``from sats.x import y``
    counts ``sats.x.y`` where that is a module, else ``sats.x``)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sats":
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            out |= subs or {node.module}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("sats.")}
    return out & known


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    # A package's __init__ re-exports nothing here, so an import of "sats.x" is of its __init__.
    return {m: _imports(t, set(modules)) - {m} for m, t in modules.items()}


def test_no_import_cycles_between_modules() -> None:
    graph = _graph()

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
    # Guards the tests above and below against passing on an empty or wrong folder.
    modules = _modules()
    assert {"sats.model.training", "sats.predict.inference", "sats.model.run", "sats.data.io", "sats.data.dicom"} <= set(modules)
    assert "sats.model.run" in _graph()["sats.predict.inference"]


#: The plane searches of sats.geometry.alignment; estimate_plane (their one caller) decides
#: which runs and what an unreliable plane becomes.
PLANE_SEARCHES = {"find_plane", "find_plane_registration", "plane_from_atlas"}


def _callers(name_set: set[str]) -> dict[str, set[str]]:
    """{module: names of ``name_set`` it calls} (plain or attribute calls), definitions aside."""
    out: dict[str, set[str]] = {}
    for module, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if name in name_set:
                    out.setdefault(module, set()).add(name)
    return out


def test_only_the_preprocessor_module_calls_the_plane_searches() -> None:
    callers = _callers(PLANE_SEARCHES)
    assert set(callers) == {"sats.geometry.preprocessing"}, callers
    # and that module calls every one of them: the check would notice a search gone elsewhere
    assert callers["sats.geometry.preprocessing"] == PLANE_SEARCHES


def test_prediction_and_the_dicom_node_do_not_import_the_test_bed_generator() -> None:
    code = ("import sys, sats.predict.inference, sats.predict.serve; "
            "bad = sorted(m for m in sys.modules if m.startswith('sats.data.lesion') or m.startswith('sats.data.phantom')); "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"imported: {proc.stdout.strip()} {proc.stderr[-500:]}"
    # the landmarks prediction does use are there
    code = "import sys, sats.predict.inference; sys.exit(0 if 'sats.geometry.landmarks' in sys.modules else 1)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0

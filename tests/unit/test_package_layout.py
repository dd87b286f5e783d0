"""No two modules of one captioner package import each other, even through a function-level
(lazy) import: "Layout" in the issue that untangled decoding/beam-greedy and
features/onnx-quantize (data has its own, stricter test: test_data_layer.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import captioner

ROOT = Path(captioner.__file__).parent
PACKAGES = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())


def _imports(path: Path, package: str) -> set[str]:
    """The modules of ``package`` that a file imports, at top level or inside a function."""
    found: set[str] = set()
    prefix = f"captioner.{package}."
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == f"captioner.{package}":
                found.update(a.name for a in node.names if (path.parent / f"{a.name}.py").exists())
            elif node.module.startswith(prefix):
                found.add(node.module[len(prefix) :].split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(
                a.name[len(prefix) :].split(".")[0] for a in node.names if a.name.startswith(prefix)
            )
    return found


def _cycles(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph.get(start, ()))
        while todo:
            here = todo.pop()
            if here == goal:
                return True
            if here not in seen:
                seen.add(here)
                todo.extend(graph.get(here, ()))
        return False

    return [(a, b) for a in graph for b in graph[a] if a < b and reaches(b, a)]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_a_package(package):
    folder = ROOT / package
    graph = {p.stem: _imports(p, package) - {p.stem} for p in folder.glob("*.py")}
    graph.pop("__init__", None)
    assert _cycles(graph) == []


def test_the_checker_finds_a_cycle():
    assert _cycles({"beam": {"greedy"}, "greedy": {"beam"}, "fused": set()}) == [("beam", "greedy")]

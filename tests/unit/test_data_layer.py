"""The data layer's imports (docs/ARCHITECTURE.md, "Layers"): it reads only the base modules
below it, never features/model/... above it, not even through a function-level (lazy) import.
(No two of its modules import each other: test_package_layout.py checks that for every
package.)"""

from __future__ import annotations

import ast
from pathlib import Path

import captioner.data

DATA_DIR = Path(captioner.data.__file__).parent
BASE = {"errors", "io", "settings", "progress", "overlap", "devices"}  # layer 0


def _imports(path: Path) -> set[str]:
    """Every ``captioner.*`` module a file imports, at top level or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "captioner.data":  # from captioner.data import normalize
                found.update(f"captioner.data.{a.name}" for a in node.names)
            elif node.module.startswith("captioner."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("captioner."))
    return found


def _data_graph() -> dict[str, set[str]]:
    return {p.stem: _imports(p) for p in sorted(DATA_DIR.glob("*.py"))}


def test_data_imports_nothing_above_the_base_layer():
    upward = {
        f"{module} -> {target}"
        for module, targets in _data_graph().items()
        for target in targets
        if target.split(".")[1] not in BASE | {"data"}
    }
    assert not upward, sorted(upward)

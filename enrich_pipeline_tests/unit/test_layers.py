"""The floors of the package: each imports only the floors below it, and only the Dagster
layer (``defs``) imports ``dagster``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import enrich_pipeline

PACKAGE = Path(enrich_pipeline.__file__).parent

# Floor of each top-level part of the package; the same floor's parts never import each other.
FLOORS = {
    "redaction": 0,
    "enrichment": 1,
    "settings": 2,
    "db": 3,
    "providers": 3,
    "pipeline": 4,
    "bootstrap": 5,
    "defs": 6,
    # The commands sit on top: ``enrich-dagster`` reaches Dagster's instance through ``defs``.
    "cli": 7,
}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def part_of(module: str) -> str | None:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 and pieces[0] == "enrich_pipeline" else None


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_every_part_has_a_floor() -> None:
    parts = {part_of(m) for m in modules()} - {None}
    assert parts <= set(FLOORS), parts - set(FLOORS)


def test_arrows_only_point_down() -> None:
    wrong = []
    for module, path in modules().items():
        mine = part_of(module)
        if mine is None:
            continue
        for imported in imports_of(path):
            theirs = part_of(imported)
            if theirs is None or theirs == mine:
                continue
            if FLOORS[theirs] >= FLOORS[mine]:
                wrong.append(f"{module} imports {imported}")
    assert wrong == []


def test_only_the_dagster_layer_imports_dagster() -> None:
    outside = [
        module
        for module, path in modules().items()
        if part_of(module) != "defs"
        and any(i == "dagster" or i.startswith(("dagster.", "dagster_")) for i in imports_of(path))
    ]
    assert outside == []


def test_every_other_module_imports_without_dagster() -> None:
    """With ``dagster`` unimportable, every module outside ``defs`` still imports."""
    names = [m for m in modules() if part_of(m) != "defs"]
    script = (
        "import importlib, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'dagster' or name.startswith(('dagster.', 'dagster_')):\n"
        "            raise ImportError('dagster is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "assert not any(m == 'dagster' or m.startswith('dagster.') for m in sys.modules)\n"
        "print('imported', len(" + repr(names) + "))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"imported {len(names)}" in done.stdout

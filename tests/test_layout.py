"""The layout's rules, kept by a test: no import circles among the project's modules, imports
go one way between packages, and every ledger script opens with its KEYS, ARGV and reply."""

from __future__ import annotations

import ast
from pathlib import Path

from cgrid.ledger.ledger import SCRIPTS, SCRIPTS_DIR

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cgrid", "producer", "delivery", "worker", "archive", "ops", "bench")
# Which packages each package may import (besides itself): the direction of the layout.
ALLOWED = {
    "cgrid": set(),
    "producer": {"cgrid"},
    "delivery": {"cgrid"},
    "archive": {"cgrid"},
    "worker": {"cgrid", "delivery"},
    "ops": {"cgrid", "producer", "archive", "delivery", "worker"},
    "bench": {"cgrid", "producer", "delivery", "archive", "worker", "ops", "tests"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports (at any depth of the file: lazy imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from pkg import mod`` depends on pkg.mod; ``from mod import name`` on mod
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    modules = set(files) | {"tests", "tests.helpers"}
    return {name: imports_of(path, modules) - {name} for name, path in files.items()}


def test_no_import_circles() -> None:
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt):], nxt])
            elif nxt in graph and nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_packages_import_one_way() -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if (src := module.split(".")[0]) != (dst := target.split(".")[0]) and dst not in ALLOWED[src]
    )
    assert wrong == []


def test_every_ledger_script_opens_with_its_keys_argv_and_reply() -> None:
    names = sorted(p.stem for p in SCRIPTS_DIR.glob("*.lua") if p.stem != "common")
    assert names == sorted(SCRIPTS)
    for name in names:
        head = []
        for line in (SCRIPTS_DIR / f"{name}.lua").read_text().splitlines():
            if not line.startswith(("--", "#!")):
                break
            head.append(line)
        text = "\n".join(head)
        for label in ("-- KEYS:", "-- ARGV:", "-- Reply:"):
            assert label in text, f"{name}.lua: its opening comment lacks {label!r}"

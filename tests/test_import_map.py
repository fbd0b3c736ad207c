"""The import map of veil/: the arrows DESIGN.md says never exist, and no import circle.

Read with ``ast`` only (nothing of veil is imported, so this runs in well under a second): every ``import`` and
``from ... import`` in a veil module, at module level or inside a function (a lazy import is still an arrow),
``TYPE_CHECKING`` blocks included. ``importlib.import_module`` with a computed name is not read (the task registry and
cli.py's dispatch table use it; they load only task modules and sub-command modules).

A room is a folder of veil/ (``privacy``, ``audit``, ...) or a top-level module (``simulation``, ``report``, ...).
Run as a script to print the arrows between rooms: ``python tests/test_import_map.py``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "veil"

# room -> rooms it must never import (DESIGN.md, "Arrows that never exist"; the audit wing: "nothing imports it
# but the CLI", where `veil report` shows an audit's control arm)
NEVER: dict[str, set[str]] = {
    "server": {"client", "audit"},
    "strategies": {"client", "audit"},
    "client": {"server", "audit"},
    "task": {"client", "server", "audit", "flower"},
    "privacy": {"client", "server", "task", "simulation", "audit", "flower"},
    "conf": {"task", "privacy", "client", "server", "simulation", "preflight", "audit", "flower"},  # pure data
    "security": {"audit"},
    "simulation": {"audit"},
    "preflight": {"audit"},
    # the Flower wing sits below both sides: it adapts Flower and decides nothing of veil's own
    "flower": {"client", "server", "strategies", "task", "privacy", "simulation", "preflight", "audit", "cli",
               "report"},
}
AUDIT_IMPORTERS = {"cli", "report", "audit"}  # the only rooms that may import veil.audit
# room -> modules of the Flower wing it must never import: the coordinator never imports the node's half (the
# executor's Runtime API client), the node never imports the coordinator's (the round loop, the polling grid)
NEVER_MODULES: dict[str, set[str]] = {
    "server": {"veil.flower.runtime"},
    "strategies": {"veil.flower.runtime"},
    "client": {"veil.flower.workflows", "veil.flower.polling"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known veil module that ``name`` names or lies in."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The veil modules ``module`` imports (``from a import b`` counts ``a.b`` when b is a module, else ``a``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            if target == "veil" or target.startswith("veil."):
                found = _resolve(target, known)
                if found and found != module:
                    out.add(found)
    return out


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports_of(m, p, known) for m, p in known.items()}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "veil"


def room_arrows(graph: dict[str, set[str]]) -> dict[tuple[str, str], list[str]]:
    """(from room, to room) -> the module imports that make the arrow, e.g. ``veil.server.app -> veil.task.model``."""
    arrows: dict[tuple[str, str], list[str]] = {}
    for src, targets in graph.items():
        for dst in targets:
            if room(src) != room(dst):
                arrows.setdefault((room(src), room(dst)), []).append(f"{src} -> {dst}")
    return arrows


def cycles(graph: dict[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted: the import circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
    return sorted(found)


def broken_nevers(graph: dict[str, set[str]]) -> list[str]:
    broken = []
    for (src, dst), why in sorted(room_arrows(graph).items()):
        if dst in NEVER.get(src, ()) or (dst == "audit" and src not in AUDIT_IMPORTERS):
            broken.append(f"{src} -> {dst}: {', '.join(sorted(why))}")
    return broken


def test_the_map_reads_every_veil_module_and_finds_real_arrows() -> None:
    graph = import_graph()
    assert "veil.simulation" in graph and "veil.privacy.ledger" in graph
    assert "veil.privacy.accounting" in graph["veil.privacy.ledger"]  # a known arrow is seen


def test_a_relative_and_a_lazy_import_are_arrows(tmp_path: Path) -> None:
    pkg = tmp_path / "veil"
    (pkg / "a").mkdir(parents=True)
    (pkg / "a" / "__init__.py").write_text("from .b import x\n")
    (pkg / "a" / "b.py").write_text("def f():\n    from veil.c import y\n")
    (pkg / "c.py").write_text("")
    known = {".".join(p.relative_to(tmp_path).with_suffix("").parts).removesuffix(".__init__"): p
             for p in pkg.rglob("*.py")}
    assert imports_of("veil.a", pkg / "a" / "__init__.py", known) == {"veil.a.b"}
    assert imports_of("veil.a.b", pkg / "a" / "b.py", known) == {"veil.c"}


def test_cycles_finds_a_circle_and_nothing_else() -> None:
    assert cycles({"a": {"b"}, "b": {"a", "c"}, "c": set()}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_arrow_that_design_md_says_never_exists() -> None:
    assert broken_nevers(import_graph()) == []


def test_neither_side_imports_the_other_sides_half_of_the_flower_wing() -> None:
    graph = import_graph()
    crossing = sorted(f"{src} -> {dst}" for src, targets in graph.items() for dst in targets
                      if dst in NEVER_MODULES.get(room(src), ()))
    assert crossing == []
    assert "veil.flower.runtime" in graph["veil.client.executor"]  # a known arrow is seen, so the rule can fail


def test_no_import_circle_between_veil_modules() -> None:
    assert cycles(import_graph()) == []


def test_privacy_imports_only_itself_and_the_ground() -> None:
    """privacy/ is pure DP: it may lean on the ground (errors, atomic, wire) and conf's schema, nothing above."""
    allowed = {"privacy", "errors", "atomic", "wire", "conf"}
    above = {dst for (src, dst) in room_arrows(import_graph()) if src == "privacy"} - allowed
    assert above == set()


if __name__ == "__main__":
    graph = import_graph()
    for (src, dst), why in sorted(room_arrows(graph).items()):
        print(f"{src} -> {dst} ({len(why)})")
    print("broken nevers:", *broken_nevers(graph) or ["none"], sep="\n  ")
    print("module circles:", *[" <-> ".join(c) for c in cycles(graph)] or ["none"], sep="\n  ")
    rooms: dict[str, set[str]] = {}
    for src, dst in room_arrows(graph):
        rooms.setdefault(src, set()).add(dst)
    print("room circles:", *[" <-> ".join(c) for c in cycles(rooms)] or ["none"], sep="\n  ")

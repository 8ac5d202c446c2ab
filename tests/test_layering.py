"""The layering the package promises, checked on its import graph.

    rpc/ (servicers)  ->  engines (timeline, profiles, privacy, nudges, ...)  ->  storage seams
    edge_agent/  ->  pulsesync (the shared kernel) only, never pulsesync.server

The graph is read from the source (every `import`, including one inside a function, which is
still a dependency), so a lazy import cannot hide an edge. An app or wearable install of the agent
must not load the server (its key vault, profile store, Prometheus), which is also checked on the
modules a real interpreter loads.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

import pulsesync.edge_agent

ROOT = Path(__file__).resolve().parent.parent
# Folder -> import name, as pyproject.toml's package-dir maps them.
PACKAGES = {
    ROOT / "proto" / "pulsesync": "pulsesync",
    ROOT / "server": "pulsesync.server",
    ROOT / "edge_agent": "pulsesync.edge_agent",
}
SERVER = "pulsesync.server"
RPC = "pulsesync.server.rpc"
AGENT = "pulsesync.edge_agent"
# The composition root builds the engines and hands each servicer the engine it adapts: the one
# place outside rpc/ that knows the servicers.
COMPOSITION_ROOTS = frozenset({"pulsesync.server.app"})

_PROBE = """
import importlib, json, pkgutil, sys
import pulsesync.edge_agent as pkg
for m in pkgutil.walk_packages(pkg.__path__, "pulsesync.edge_agent."):
    importlib.import_module(m.name)
import pulsesync
for m in pkgutil.iter_modules(pulsesync.__path__, "pulsesync."):
    if m.name not in ("pulsesync.server", "pulsesync.edge_agent"):
        importlib.import_module(m.name)
print(json.dumps(sorted(sys.modules)))
"""


def _modules() -> dict[str, Path]:
    """Every hand-written module of the three packages, by import name."""
    found: dict[str, Path] = {}
    for folder, name in PACKAGES.items():
        nested = [f for f in PACKAGES if f != folder and f.is_relative_to(folder)]
        for path in folder.rglob("*.py"):
            if any(path.is_relative_to(n) for n in nested) or path.name.endswith(
                ("_pb2.py", "_pb2_grpc.py")
            ):
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([name, *parts])] = path
    return found


MODULES = _modules()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if _is_package(module) else 0)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _known(name: str) -> str | None:
    """The longest known module that `name` (a module, or a module's attribute) lies in."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    """The project modules `module` imports, anywhere in its source."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            names.add(source)
            names.update(f"{source}.{a.name}" for a in node.names)
    edges = {k for n in names if (k := _known(n)) is not None}
    edges.discard(module)
    return edges


GRAPH = {m: imports_of(m) for m in MODULES}


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _edges_into(sources: Iterable[str], target: str) -> dict[str, list[str]]:
    found = {m: sorted(i for i in GRAPH[m] if _under(i, target)) for m in sources}
    return {m: v for m, v in found.items() if v}


def _is_storage(module: str) -> bool:
    """A storage seam or backend: the storage package, or a domain's store/storage module."""
    leaf = module.rpartition(".")[2]
    return (
        _under(module, f"{SERVER}.storage")
        or ".storage." in module + "."
        or leaf in {"store", "storage", "stores"}
        or leaf.startswith(("sqlite", "postgres"))
    )


def test_the_graph_sees_every_package_and_real_edges() -> None:
    assert sum(_under(m, RPC) for m in MODULES) >= 5
    assert sum(_under(m, AGENT) for m in MODULES) > 20
    assert any(_is_storage(m) for m in MODULES)
    # Sanity: a relative or lazy import is an edge too (the composition root knows servicers).
    assert any(_under(i, RPC) for i in GRAPH["pulsesync.server.app"])


def test_the_agent_and_kernel_never_import_the_server() -> None:
    outside = [m for m in MODULES if not _under(m, SERVER)]
    assert _edges_into(outside, SERVER) == {}


def test_only_the_composition_root_knows_the_servicers() -> None:
    others = [
        m
        for m in MODULES
        if _under(m, SERVER) and not _under(m, RPC) and m not in COMPOSITION_ROOTS
    ]
    offenders = _edges_into(others, RPC)
    assert offenders == {}


def test_storage_imports_neither_servicers_nor_engines() -> None:
    storage = [m for m in MODULES if _is_storage(m)]
    assert _edges_into(storage, RPC) == {}
    assert _edges_into(storage, f"{SERVER}.app") == {}


def test_importing_every_agent_and_kernel_module_loads_no_server_module() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=100
    )
    loaded = json.loads(out.stdout)
    agent = [m for m in loaded if m.startswith("pulsesync.edge_agent.")]
    assert len(agent) > 10, "the probe walked the agent's modules"
    server = [m for m in loaded if _under(m, SERVER)]
    assert server == [], f"the agent or kernel loads server modules: {server}"


def test_every_agent_module_is_walked() -> None:
    walked = {
        m.name
        for m in pkgutil.walk_packages(pulsesync.edge_agent.__path__, "pulsesync.edge_agent.")
    }
    assert walked | {AGENT} == {m for m in MODULES if _under(m, AGENT)}


def _imported_names(path: Path) -> set[str]:
    """Absolute names a source file imports (modules and their attributes)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


SERVER_DIR = ROOT / "server"
# Where the server's SQL may live: the storage seams' SQLite implementations, the migrations and
# the database wrapper under storage/, and the ingest writer process (the SQLite event writer).
_SQL_HOMES = (SERVER_DIR / "storage",)
_SQL_FILES = {SERVER_DIR / "timeline" / "committer.py", SERVER_DIR / "timeline" / "writer.py"}
_SQL_TEXT = re.compile(
    r"\.execute(many)?\(|\b(SELECT|INSERT INTO|UPDATE|DELETE FROM|PRAGMA|CREATE TABLE)\s[\w*(]"
)


def _sql_outside_storage() -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for path in SERVER_DIR.rglob("*.py"):
        if path in _SQL_FILES or any(home in path.parents for home in _SQL_HOMES):
            continue
        lines = [
            n
            for n, line in enumerate(path.read_text().splitlines(), start=1)
            if _SQL_TEXT.search(line) and not line.lstrip().startswith("#")
        ]
        if lines:
            found[str(path.relative_to(ROOT))] = lines
    return found


def test_sql_lives_only_behind_the_storage_seams() -> None:
    assert _sql_outside_storage() == {}


def test_the_sql_check_finds_sql(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The check above must not pass by finding nothing: it sees a statement in a module.
    probe = SERVER_DIR / "nudges" / "_layering_probe.py"
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: iter([probe]))
    monkeypatch.setattr(
        Path, "read_text", lambda self, *a, **k: 'await db.execute("SELECT 1 FROM users")\n'
    )
    assert _sql_outside_storage() == {"server/nudges/_layering_probe.py": [1]}


def test_engines_and_servicers_name_no_sqlite_type() -> None:
    # Engines and servicers see storage Protocols only; a driver type there ties them to SQLite.
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            n for n in _imported_names(p) if n.split(".")[0] in ("aiosqlite", "sqlite3")
        )
        for p in SERVER_DIR.rglob("*.py")
        if not any(home in p.parents for home in _SQL_HOMES) and p not in _SQL_FILES
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_storage_protocols_name_no_sqlite_type() -> None:
    protocols = [p for p in (SERVER_DIR / "storage").glob("*.py") if p.name not in ("db.py",)]
    assert len(protocols) >= 8
    offenders = {
        p.name: sorted(n for n in _imported_names(p) if n.split(".")[0] in ("aiosqlite", "sqlite3"))
        for p in protocols
    }
    assert {k: v for k, v in offenders.items() if v} == {}


# What the rpc layer may take from the storage package: the SQLite error codes and the
# PostgreSQL error mapping (a failed call's status), and the secret-file helper (page token key).
_RPC_STORAGE_INFRASTRUCTURE = {
    f"{SERVER}.storage.db",
    f"{SERVER}.storage.files",
    f"{SERVER}.storage.postgres.errors",
}


def test_servicers_reach_storage_only_through_their_engine() -> None:
    reached = {
        m: sorted(set(edges) - _RPC_STORAGE_INFRASTRUCTURE)
        for m, edges in _edges_into(
            [m for m in MODULES if _under(m, RPC)], f"{SERVER}.storage"
        ).items()
    }
    assert {m: v for m, v in reached.items() if v} == {}

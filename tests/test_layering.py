"""The layering the package promises: the edge agent depends on the shared kernel, never the server.

An app or wearable install of the agent must not load the server (its key vault, profile store,
Prometheus, aiosqlite): checked both on the import graph at run time and on the source text.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pulsesync.edge_agent

ROOT = Path(__file__).resolve().parent.parent
EDGE = ROOT / "edge_agent"
KERNEL = ROOT / "proto" / "pulsesync"

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


def _imported_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_importing_every_agent_and_kernel_module_loads_no_server_module() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=100
    )
    loaded = json.loads(out.stdout)
    agent = [m for m in loaded if m.startswith("pulsesync.edge_agent.")]
    assert len(agent) > 10, "the probe walked the agent's modules"
    server = [m for m in loaded if m == "pulsesync.server" or m.startswith("pulsesync.server.")]
    assert server == [], f"the agent or kernel loads server modules: {server}"


def test_no_agent_or_kernel_source_imports_the_server() -> None:
    sources = [*EDGE.rglob("*.py"), *(p for p in KERNEL.glob("*.py"))]
    assert len(sources) > 20
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            n for n in _imported_names(p) if n.startswith("pulsesync.server")
        )
        for p in sources
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_every_agent_module_is_walked() -> None:
    walked = {
        m.name
        for m in pkgutil.walk_packages(pulsesync.edge_agent.__path__, "pulsesync.edge_agent.")
    }
    on_disk = {p for p in EDGE.rglob("*.py")}
    assert len(walked) >= len(on_disk) - 1  # every file but the package's own __init__


SERVER = ROOT / "server"
# Where the server's SQL may live: the storage seams' SQLite implementations, the migrations and
# the database wrapper under storage/, and the ingest writer process (the SQLite event writer).
_SQL_HOMES = (SERVER / "storage",)
_SQL_FILES = {SERVER / "timeline" / "committer.py", SERVER / "timeline" / "writer.py"}
_SQL_TEXT = re.compile(
    r"\.execute(many)?\(|\b(SELECT|INSERT INTO|UPDATE|DELETE FROM|PRAGMA|CREATE TABLE)\s[\w*(]"
)


def _sql_outside_storage() -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for path in SERVER.rglob("*.py"):
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
    probe = SERVER / "nudges" / "_layering_probe.py"
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
        for p in SERVER.rglob("*.py")
        if not any(home in p.parents for home in _SQL_HOMES) and p not in _SQL_FILES
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_storage_protocols_name_no_sqlite_type() -> None:
    protocols = [p for p in (SERVER / "storage").glob("*.py") if p.name not in ("db.py",)]
    assert len(protocols) >= 8
    offenders = {
        p.name: sorted(n for n in _imported_names(p) if n.split(".")[0] in ("aiosqlite", "sqlite3"))
        for p in protocols
    }
    assert {k: v for k, v in offenders.items() if v} == {}

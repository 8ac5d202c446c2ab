"""Versioned migrations: the numbered SQL files a package ships (`NNNN_name.sql`), in order.

Both backends read theirs this way (SQLite: `pulsesync.server.storage.migrations`; PostgreSQL:
`pulsesync.server.storage.postgres.migrations` and the key vault's own set) and apply them
with their own runner.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Final

_MIGRATION_NAME: Final = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def read_migrations(package: str) -> list[Migration]:
    """The numbered SQL files shipped in package, in order (RuntimeError on a number twice)."""
    found: list[Migration] = []
    for entry in resources.files(package).iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration numbers: {versions}")
    return found

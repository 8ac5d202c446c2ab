"""Which tables hold a person's data: every table with a `user_id` column, found at run time.

Components add tables in their own migrations; because discovery reads the schema, export,
erasure and the summary cover a new table without anyone remembering to register it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import aiosqlite

USER_COLUMN: Final = "user_id"
# Columns never exported: credential hashes and key material. What they protect is exported
# in readable form by the owning component (e.g. the decrypted profile).
_SECRET_COLUMN: Final = re.compile(
    r"(_hash$|^hash$|secret|^token|_token$|wrapped|^key$|_key$|nonce|ciphertext)"
)
_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    decl_type: str

    @property
    def is_secret(self) -> bool:
        return bool(_SECRET_COLUMN.search(self.name.lower()))


@dataclass(frozen=True, slots=True)
class UserTable:
    """A table with a user_id column and its columns in declaration order."""

    name: str
    columns: tuple[Column, ...]

    @property
    def exported_columns(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if not c.is_secret)

    @property
    def omitted_columns(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.is_secret)

    def has(self, column: str) -> bool:
        return any(c.name == column for c in self.columns)


def quote(name: str) -> str:
    """An identifier from the schema, quoted for SQL (names are checked, never user input)."""
    if not _NAME.match(name):
        raise ValueError(f"unexpected identifier in schema: {name!r}")
    return f'"{name}"'


async def all_tables(conn: aiosqlite.Connection) -> list[UserTable]:
    """Every ordinary table with its columns, in name order."""
    async with conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        " ORDER BY name"
    ) as c:
        names = [str(r[0]) for r in await c.fetchall()]
    tables: list[UserTable] = []
    for name in names:
        async with conn.execute(
            "SELECT name, type FROM pragma_table_info(?) ORDER BY cid", (name,)
        ) as c:
            cols = tuple(Column(str(r[0]), str(r[1] or "")) for r in await c.fetchall())
        tables.append(UserTable(name, cols))
    return tables


async def user_tables(conn: aiosqlite.Connection) -> list[UserTable]:
    """Tables holding per-person rows; `users` last (others may reference it)."""
    found = [t for t in await all_tables(conn) if t.has(USER_COLUMN)]
    found.sort(key=lambda t: (t.name == "users", t.name))
    return found


async def table_exists(conn: aiosqlite.Connection, name: str) -> UserTable | None:
    """The table called name, if the schema has it."""
    for t in await all_tables(conn):
        if t.name == name:
            return t
    return None

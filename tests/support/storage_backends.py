"""Domain-storage fixtures over both backends: the same test runs on SQLite and PostgreSQL.

`storage_backend` gives a `Backend`: the profile, privacy and nudge storage seams of one fresh
database (a SQLite file, or a PostgreSQL schema of its own; see tests/support/postgres.py), and
a few helpers to seed rows that other domains own (people, devices, events, consent). Seed SQL
is written once with `?` placeholders and numbered for PostgreSQL. `key_vault` gives the key
vault of either backend: a SQLite vault file, or a PostgreSQL vault in a schema of its own.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from pulsesync.server.storage.database_url import parse_database
from pulsesync.server.storage.db import Database
from pulsesync.server.storage.keys import KeyVaultStorage
from pulsesync.server.storage.nudges import NudgeStorage
from pulsesync.server.storage.postgres.keys import PostgresKeyVault
from pulsesync.server.storage.postgres.migrate import migrate
from pulsesync.server.storage.postgres.nudges import PostgresNudgeStorage
from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.server.storage.postgres.privacy import PostgresPrivacyStorage
from pulsesync.server.storage.postgres.profiles import PostgresProfileStorage
from pulsesync.server.storage.privacy import PrivacyStorage
from pulsesync.server.storage.profiles import ProfileStorage
from pulsesync.server.storage.sqlite.keys import KeyVault
from pulsesync.server.storage.sqlite.nudges import SqliteNudgeStorage
from pulsesync.server.storage.sqlite.privacy import SqlitePrivacyStorage
from pulsesync.server.storage.sqlite.profiles import SqliteProfileStorage
from tests.support.postgres import fresh_schema

BACKENDS = ("sqlite", "postgres")
_MARK = re.compile(r"\?")


def numbered(sql: str) -> str:
    """`?` placeholders as PostgreSQL's $1, $2, ..."""
    counter = iter(range(1, 1000))
    return _MARK.sub(lambda _: f"${next(counter)}", sql)


@dataclass
class Backend:
    name: Literal["sqlite", "postgres"]
    profiles: ProfileStorage
    privacy: PrivacyStorage
    nudges: NudgeStorage
    db: Database | None = None
    pool: PostgresPool | None = None

    async def execute(self, sql: str, *args: Any) -> None:
        if self.pool is not None:
            await self.pool.execute(numbered(sql), *args)
        else:
            assert self.db is not None
            async with self.db.transaction() as tx:
                await tx.execute(sql, args)

    async def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        if self.pool is not None:
            return [tuple(r) for r in await self.pool.fetch(numbered(sql), *args)]
        assert self.db is not None
        async with self.db.reader.execute(sql, args) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    async def scalar(self, sql: str, *args: Any) -> Any:
        found = await self.rows(sql, *args)
        return found[0][0] if found else None

    async def add_user(self, name: str, create_us: int = 1) -> int:
        await self.execute("INSERT INTO users (name, create_us) VALUES (?, ?)", name, create_us)
        return int(await self.scalar("SELECT user_id FROM users WHERE name = ?", name))

    async def add_device(self, user_id: int, device_id: str, kind: int = 1) -> int:
        await self.execute(
            "INSERT INTO devices (user_id, device_id, name, kind, token_hash, pair_us)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            user_id,
            device_id,
            device_id,
            kind,
            device_id.encode().ljust(32, b"\0"),
            1,
        )
        return int(
            await self.scalar("SELECT device_pk FROM devices WHERE device_id = ?", device_id)
        )


@pytest.fixture(params=BACKENDS)
def backend_server(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    """The backend's name, and for PostgreSQL the session's database: asked for here, in a
    sync fixture, because it is made with asyncio.run (a skip, or a failure under
    PULSESYNC_TEST_POSTGRES_REQUIRED=1, where no server answers)."""
    if request.param == "postgres":
        return "postgres", str(request.getfixturevalue("postgres_database"))
    return "sqlite", None


@pytest.fixture
async def storage_backend(
    backend_server: tuple[str, str | None], tmp_path: Path
) -> AsyncIterator[Backend]:
    _, database = backend_server
    if database is None:
        async with await Database.open(tmp_path / "pulsesync.db") as db:
            yield Backend(
                "sqlite",
                SqliteProfileStorage(db),
                SqlitePrivacyStorage(db),
                SqliteNudgeStorage(db),
                db=db,
            )
    else:
        async with (
            fresh_schema(database) as dsn,
            await PostgresPool.open(dsn, min_size=1, max_size=4) as pool,
        ):
            await migrate(pool)
            yield Backend(
                "postgres",
                PostgresProfileStorage(pool),
                PostgresPrivacyStorage(pool),
                PostgresNudgeStorage(pool),
                pool=pool,
            )


@pytest.fixture
async def key_vault(
    backend_server: tuple[str, str | None], tmp_path: Path
) -> AsyncIterator[KeyVaultStorage]:
    _, database = backend_server
    if database is None:
        yield await KeyVault.create(tmp_path / "keyvault.db")
    else:
        async with (
            fresh_schema(database) as dsn,
            await PostgresKeyVault.open(parse_database(dsn)) as vault,
        ):
            yield vault

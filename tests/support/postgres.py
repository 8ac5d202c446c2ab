"""A real PostgreSQL for tests: a fresh database per test session, a fresh schema per test.

The server comes from PULSESYNC_TEST_POSTGRES (default: the development machines' server,
trust authentication). Where none answers (a laptop without PostgreSQL) the tests that need it
are skipped with one reason; with PULSESYNC_TEST_POSTGRES_REQUIRED=1 (set by .ci/run) they fail
instead, so CI cannot pass without having run them.

Every test gets its own schema in the session's database, named in its DSN's search_path (an
asyncpg DSN passes unknown query parameters as server settings), so everything a test connects
with sees only its own tables.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from pulsesync.server.storage.postgres.pool import PostgresPool

DEFAULT_DSN: Final = "postgresql://postgres@127.0.0.1:5432/test"
REQUIRED_ENV: Final = "PULSESYNC_TEST_POSTGRES_REQUIRED"
CONNECT_TIMEOUT_S: Final = 10.0


async def until(
    check: Callable[[], Awaitable[bool]], within_s: float = 60.0, poll_s: float = 0.02
) -> None:
    """Wait until check() is true (a condition, never a fixed sleep); fail after within_s."""
    async with asyncio.timeout(within_s):
        while True:
            if await check():
                return
            await asyncio.sleep(poll_s)


def server_dsn() -> str:
    return os.environ.get("PULSESYNC_TEST_POSTGRES") or DEFAULT_DSN


def with_database(dsn: str, database: str, query: str = "") -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", query, ""))


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRED_ENV) == "1":
        pytest.fail(f"{REQUIRED_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


async def _create(dsn: str, name: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop(dsn: str, name: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """The DSN of a database created for this test session (dropped at its end)."""
    dsn = server_dsn()
    name = f"pulsesync_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        asyncio.run(_create(dsn, name))
    except (OSError, asyncpg.PostgresError, TimeoutError) as e:
        _unavailable(
            f"no PostgreSQL answers at PULSESYNC_TEST_POSTGRES={dsn} ({type(e).__name__}: {e})"
        )
    try:
        yield with_database(dsn, name)
    finally:
        asyncio.run(_drop(dsn, name))


@asynccontextmanager
async def fresh_database(database_dsn: str) -> AsyncIterator[str]:
    """The DSN of a database of its own on database_dsn's server (dropped after): for what must
    be a whole database, not a schema, e.g. a key vault, which refuses to share the main one."""
    name = f"pulsesync_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    await _create(database_dsn, name)
    try:
        yield with_database(database_dsn, name)
    finally:
        await _drop(database_dsn, name)


@asynccontextmanager
async def fresh_schema(database_dsn: str) -> AsyncIterator[str]:
    """A DSN whose connections see only a fresh, empty schema of their own (dropped after)."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(database_dsn, timeout=CONNECT_TIMEOUT_S)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()
    try:
        yield f"{database_dsn}?search_path={schema}"
    finally:
        conn = await asyncpg.connect(database_dsn, timeout=CONNECT_TIMEOUT_S)
        try:
            # A failed test may have left a session holding a lock here: the session's
            # database is dropped WITH (FORCE) at the end anyway.
            await conn.execute("SET lock_timeout = '30s'")
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        except asyncpg.LockNotAvailableError:
            pass
        finally:
            await conn.close()


@pytest.fixture
async def postgres_dsn(postgres_database: str) -> AsyncIterator[str]:
    """A DSN whose connections see only a fresh, empty schema of their own."""
    async with fresh_schema(postgres_database) as dsn:
        yield dsn


@pytest.fixture
async def pg_pool(postgres_dsn: str) -> AsyncIterator[PostgresPool]:
    """A pool on the test's own empty schema."""
    pool = await PostgresPool.open(postgres_dsn, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def migrated_pool(pg_pool: PostgresPool) -> PostgresPool:
    """A pool on the test's own schema with every migration applied."""
    from pulsesync.server.storage.postgres.migrate import migrate

    await migrate(pg_pool)
    return pg_pool

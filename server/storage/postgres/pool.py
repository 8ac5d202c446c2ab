"""A pool of PostgreSQL connections whose transactions survive cancellation cleanly.

Any await of a request can be cancelled (the client went away, the server is stopping). A
connection whose task was cancelled mid-statement or mid-transaction is in a state nobody can
vouch for: a query may still run on the server, a transaction may be open and hold row locks.
Rolling back would need another round trip, which could itself hang or be cancelled. So such
a connection is closed and the pool opens a fresh one when it next needs it. The server rolls
back and releases the locks of a closed session as soon as it notices: at once when the session
was idle in its transaction, and within CLIENT_CHECK_MS when a statement was running (the
`client_connection_check_interval` of PostgreSQL 14+, set on every pooled connection; without it
a cancelled long statement would run on, holding its locks). A block that ends with an ordinary
exception is rolled back on its connection, which goes back to the pool.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final, Literal, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from pulsesync.server.storage.database_url import DatabaseUrl
from pulsesync.server.storage.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

# Enough for a replica's request handlers, its ingest writer and its background jobs; each
# PostgreSQL connection is a server process, so N replicas x this must fit max_connections.
DEFAULT_MAX_SIZE: Final = 10
APPLICATION_NAME: Final = "pulsesync"
# How often a backend running a statement checks that its client is still there (a poll of the
# socket: cheap). Bounds how long a cancelled request's statement and locks outlive it.
CLIENT_CHECK_MS: Final = 1000
MIN_SERVER_VERSION: Final = 14

Isolation = Literal["read_committed", "repeatable_read", "serializable"]
# A pooled connection: asyncpg's proxy, with every method of a connection.
Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"


def server_settings(*, read_only: bool = False) -> dict[str, str]:
    """Session settings of every connection PulseSync opens; a read-only pool's connections
    refuse every write (a write sent there by mistake fails loudly, even on a primary)."""
    settings = {
        "application_name": APPLICATION_NAME,
        "client_connection_check_interval": str(CLIENT_CHECK_MS),
    }
    if read_only:
        settings["default_transaction_read_only"] = "on"
    return settings


class PostgresPool:
    """asyncpg's pool, with connections and transactions that a cancellation leaves clean."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = DEFAULT_MAX_SIZE,
        read_only: bool = False,
    ) -> PostgresPool:
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                server_settings=server_settings(read_only=read_only),
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            where = DatabaseUrl("postgres", dsn=dsn).redacted()
            raise DatabaseUnavailable(f"cannot connect to PostgreSQL at {where}: {e}") from e
        async with pool.acquire() as conn:
            version = conn.get_server_version()
        if version.major < MIN_SERVER_VERSION:
            await pool.close()
            raise RuntimeError(
                f"PostgreSQL {version.major} is too old: PulseSync needs {MIN_SERVER_VERSION} or "
                "newer (for client_connection_check_interval, which stops a cancelled request's "
                "statement)"
            )
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def __aenter__(self) -> PostgresPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def size(self) -> int:
        """Connections open now (idle or in use)."""
        return self._pool.get_size()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A connection of the pool for the block; closed instead of reused if the block was
        cancelled or left it inside a transaction."""
        conn: Connection = await self._pool.acquire()
        try:
            yield conn
        except BaseException as e:
            if not isinstance(e, Exception) or conn.is_in_transaction():
                # Cancelled (or interrupted) mid-statement: nothing may reuse this session.
                conn.terminate()
            raise
        else:
            if conn.is_in_transaction():
                log.error("a connection was returned inside a transaction; closing it")
                conn.terminate()
        finally:
            # The pool's release is shielded; a closed connection is replaced on next acquire.
            await self._pool.release(conn)

    @asynccontextmanager
    async def transaction(
        self, *, isolation: Isolation = "read_committed", readonly: bool = False
    ) -> AsyncIterator[Connection]:
        """A connection inside a transaction: committed when the block ends normally, rolled
        back when it raises, and closed (so the server rolls back) when it is cancelled.

        A commit that is itself cancelled may or may not have happened; callers that promise
        something on commit (an ingest ack) must treat it as not done."""
        async with self.connection() as conn:
            tx = conn.transaction(isolation=isolation, readonly=readonly)
            await tx.start()
            try:
                yield conn
            except Exception:
                try:
                    await tx.rollback()
                except Exception:
                    conn.terminate()
                raise
            await tx.commit()

    async def execute(self, sql: str, *args: Any) -> str:
        async with self.connection() as conn:
            result: str = await conn.execute(sql, *args)
            return result

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self.connection() as conn:
            return await conn.fetch(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self.connection() as conn:
            return await conn.fetchval(sql, *args)

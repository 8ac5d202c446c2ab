"""Versioned schema migrations for PostgreSQL, safe when several replicas start at once.

The numbered files in migrations/ give the same logical schema as the SQLite migrations, with
every per-person table keyed by user_id first (docs/scaling.md). `schema_migrations` records
what is applied. The runner holds a session advisory lock for its whole run, so two replicas
(or a replica and `pulsesync db migrate`) that start together apply each migration once: the
second waits, then finds nothing left to do. Each migration is one transaction with its
bookkeeping row, so a failure or a cancellation leaves it wholly applied or not at all.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from pulsesync.server.storage.postgres.pool import Connection, PostgresPool
from pulsesync.server.storage.versions import Migration, read_migrations

log = logging.getLogger(__name__)

# The advisory lock key of the runner (any fixed bigint; this is "pulsesync" in ASCII).
MIGRATION_LOCK: Final = 0x70756C736573796E
# The main database's migrations; the key vault's own database has its own set
# (`pulsesync.server.storage.postgres.keys`).
MIGRATIONS: Final = "pulsesync.server.storage.postgres.migrations"


def load_migrations(package: str = MIGRATIONS) -> list[Migration]:
    """The numbered SQL files shipped in package, in order."""
    return read_migrations(package)


class NewerSchema(RuntimeError):
    """The database has migrations this release does not know: it was made by a newer one."""


async def migrate(
    pool: PostgresPool, *, package: str = MIGRATIONS, lock: int = MIGRATION_LOCK
) -> list[str]:
    """Apply pending migrations of package; the names applied (empty when current)."""
    async with pool.connection() as conn:
        # Session-level: held across the per-migration transactions. A cancellation closes
        # the connection (PostgresPool.connection), which releases the lock on the server.
        await conn.execute("SELECT pg_advisory_lock($1)", lock)
        try:
            applied = await _apply_pending(conn, package)
        except Exception:
            await conn.execute("SELECT pg_advisory_unlock($1)", lock)
            raise
        await conn.execute("SELECT pg_advisory_unlock($1)", lock)
        return applied


async def applied_versions(conn: Connection) -> set[int]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    return {int(r[0]) for r in await conn.fetch("SELECT version FROM schema_migrations")}


async def _apply_pending(conn: Connection, package: str) -> list[str]:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version integer PRIMARY KEY, name text NOT NULL, applied_us bigint NOT NULL)"
    )
    migrations = load_migrations(package)
    done = await applied_versions(conn)
    unknown = done - {m.version for m in migrations}
    if unknown:
        raise NewerSchema(
            f"the database has schema versions {sorted(unknown)} that this release does not "
            "know; run a release at least as new as the one that migrated it"
        )
    applied: list[str] = []
    for m in migrations:
        if m.version in done:
            continue
        async with conn.transaction():
            await conn.execute(m.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_us) VALUES ($1, $2, $3)",
                m.version,
                m.name,
                time.time_ns() // 1000,
            )
        applied.append(m.name)
    if applied:  # one line, not one per migration (a new database applies them all)
        log.info("applied %d schema migrations: %s", len(applied), ", ".join(applied))
    return applied

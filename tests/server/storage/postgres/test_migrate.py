"""PostgreSQL migrations: the SQLite schema's tables and columns, keyed by person, applied
once even when several replicas migrate at the same time."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

from pulsesync.server.storage import db as sqlite_db
from pulsesync.server.storage.postgres.migrate import MIGRATION_LOCK, load_migrations, migrate
from pulsesync.server.storage.postgres.pool import Connection, PostgresPool
from tests.support.postgres import until

# Tables that are not per person: they outlive a person's erasure (privacy), describe the
# deployment (profile_vault, the nudge models), hold imported training data whose people are
# not users, or are the user table itself. docs/scaling.md says where each lives when sharded.
NOT_PER_PERSON = {
    "server_secrets",
    "users",
    # Found by a key derived from the request_id alone, before the person is known: distributed
    # by that key on Citus (docs/scaling.md); user_id is kept for erasure.
    "idempotency_records",
    "profile_vault",
    "privacy_audit",
    "deletion_receipts",
    "imported_people",
    "imported_decisions",
    # The nudge model registry: the deployment's models, trained on many people's decisions.
    "nudge_models",
    "nudge_model_promoted",
    "schema_migrations",
    "lease_members",
    "leases",
    # Streams open on each replica (cluster state, keyed by replica; 0010).
    "nudge_streams",
}
# PostgreSQL-only: the per-person change counter (0001_core.sql), the leases (0007) and the
# record of how devices take nudges across replicas (0010).
POSTGRES_ONLY = {"timeline_heads", "lease_members", "leases", "nudge_streams", "nudge_fetches"}


async def _columns(pool: PostgresPool) -> dict[str, set[str]]:
    rows = await pool.fetch(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema()"
    )
    out: dict[str, set[str]] = {}
    for r in rows:
        out.setdefault(r["table_name"], set()).add(r["column_name"])
    return out


def _sqlite_columns(path: Path) -> dict[str, set[str]]:
    sqlite_db.migrate(path)
    conn = sqlite3.connect(path)
    try:
        tables = [
            r[0]
            for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if r[0] != "sqlite_sequence"
        ]
        return {t: {r[1] for r in conn.execute(f"PRAGMA table_info({t})")} for t in tables}
    finally:
        conn.close()


async def test_same_logical_schema_as_sqlite(pg_pool: PostgresPool, tmp_path: Path) -> None:
    applied = await migrate(pg_pool)
    assert applied == [m.name for m in load_migrations()]
    pg = await _columns(pg_pool)
    lite = _sqlite_columns(tmp_path / "lite.db")
    assert set(pg) - POSTGRES_ONLY == set(lite)
    for table, columns in lite.items():
        assert pg[table] == columns, table


async def test_every_per_person_key_starts_with_the_person(pg_pool: PostgresPool) -> None:
    await migrate(pg_pool)
    tables = set(await _columns(pg_pool))
    per_person = tables - NOT_PER_PERSON
    assert {"events", "devices", "nudges", "profile_versions", "event_changes"} <= per_person
    # Every primary key and unique constraint (or unique index) of a per-person table, with
    # its columns in order.
    rows = await pool_fetch_keys(pg_pool)
    seen: set[str] = set()
    for r in rows:
        if r["table"] not in per_person:
            continue
        seen.add(r["table"])
        assert r["columns"][0] == "user_id", (r["table"], r["index"], r["columns"])
    assert seen == per_person  # every one has a primary key
    # Foreign keys between per-person tables carry the person too (Citus co-location).
    fks = await pg_pool.fetch(
        "SELECT conrelid::regclass::text AS t, confrelid::regclass::text AS r,"
        " (SELECT array_agg(attname ORDER BY k.ord) FROM unnest(conkey) WITH ORDINALITY"
        "   AS k(n, ord) JOIN pg_attribute ON attrelid = conrelid AND attnum = k.n) AS cols"
        " FROM pg_constraint WHERE contype = 'f' AND connamespace = current_schema()::regnamespace"
    )
    for fk in fks:
        if fk["t"] in per_person:
            assert fk["cols"][0] == "user_id", (fk["t"], fk["r"], fk["cols"])


async def pool_fetch_keys(pool: PostgresPool) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT c.relname AS table, i.relname AS index,"
        " (SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(x.indkey) WITH ORDINALITY"
        "   AS k(n, ord) JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.n) AS columns"
        " FROM pg_index x JOIN pg_class c ON c.oid = x.indrelid"
        " JOIN pg_class i ON i.oid = x.indexrelid"
        " WHERE (x.indisunique OR x.indisprimary)"
        " AND c.relnamespace = current_schema()::regnamespace"
    )
    return [dict(r) for r in rows]


async def test_rerun_applies_nothing(pg_pool: PostgresPool) -> None:
    assert await migrate(pg_pool)
    assert await migrate(pg_pool) == []
    versions = [r[0] for r in await pg_pool.fetch("SELECT version FROM schema_migrations")]
    assert sorted(versions) == [m.version for m in load_migrations()]


async def test_replicas_migrating_at_once_apply_each_migration_once(postgres_dsn: str) -> None:
    pools = [await PostgresPool.open(postgres_dsn, min_size=1, max_size=2) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(p) for p in pools))
        names = [m.name for m in load_migrations()]
        # One runner applied everything (in order), the others found nothing left to do.
        assert sorted(results, key=len) == [[], [], names]
        count = await pools[0].fetchval("SELECT count(*) FROM schema_migrations")
        assert count == len(names)
    finally:
        for p in pools:
            await p.close()


async def test_runner_waits_for_a_holder_of_the_lock(pg_pool: PostgresPool) -> None:
    """Another replica mid-migration (holding the lock): the runner waits for it."""
    async with pg_pool.connection() as other:
        await other.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        runner = asyncio.create_task(migrate(pg_pool))
        await until(lambda: _advisory_waiter(other))
        assert not runner.done()
        await other.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    async with asyncio.timeout(60):
        assert len(await runner) == len(load_migrations())


async def test_cancelled_runner_releases_the_lock(pg_pool: PostgresPool) -> None:
    async with pg_pool.connection() as other:
        await other.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        runner = asyncio.create_task(migrate(pg_pool))
        await until(lambda: _advisory_waiter(other))
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await other.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    async with asyncio.timeout(60):
        assert len(await migrate(pg_pool)) == len(load_migrations())


async def _advisory_waiter(conn: Connection) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        )
    )

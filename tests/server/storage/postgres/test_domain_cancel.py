"""A cancelled call of a PostgreSQL domain store leaves no transaction, lock or half write."""

from __future__ import annotations

import asyncio
import json

from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.server.storage.postgres.privacy import PostgresPrivacyStorage
from pulsesync.server.storage.postgres.profiles import PostgresProfileStorage
from pulsesync.server.storage.privacy import AuditRow, ReceiptRow
from pulsesync.server.storage.profiles import SealedVersion
from tests.support.postgres import until


async def waiting_on_a_lock(pool: PostgresPool) -> bool:
    found = await pool.fetchval(
        "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND datname = current_database()"
    )
    return int(found) > 0


async def test_cancelled_writes_leave_nothing_behind(migrated_pool: PostgresPool) -> None:
    pool = migrated_pool
    ada = await pool.fetchval(
        "INSERT INTO users (name, create_us) VALUES ('ada', 1) RETURNING user_id"
    )
    profiles = PostgresProfileStorage(pool)
    privacy = PostgresPrivacyStorage(pool)
    sealed = SealedVersion(1, "dk", b"n" * 12, b"c")

    def records(counts: dict[str, int]) -> tuple[ReceiptRow, AuditRow]:
        d = json.dumps(counts)
        return ReceiptRow("r1", 1, "h", d, "s"), AuditRow(1, "erase", "a", "h", d)

    tables = await privacy.user_tables()
    async with pool.transaction() as holder:
        # Another replica holds the person's row: both calls block inside their transaction.
        await holder.execute("SELECT 1 FROM users WHERE user_id = $1 FOR UPDATE", ada)
        append = asyncio.create_task(profiles.append(ada, 0, sealed, "dev", 1, keep=3))
        await until(lambda: waiting_on_a_lock(pool))
        await cancelled(append)
        # Its session was closed: the server stops its wait (client_connection_check_interval).
        await until(lambda: _no_lock_waits(pool))
        erase = asyncio.create_task(privacy.erase_rows(ada, tables, records))
        await until(lambda: waiting_on_a_lock(pool))
        await cancelled(erase)
    # The cancelled sessions were closed, so the server rolled them back: nothing waits,
    # nothing was written, and the same calls now go through.
    await until(lambda: _no_lock_waits(pool))
    assert await pool.fetchval("SELECT COUNT(*) FROM profile_versions") == 0
    assert await pool.fetchval("SELECT COUNT(*) FROM deletion_receipts") == 0
    assert await profiles.append(ada, 0, sealed, "dev", 1, keep=3)
    receipt, _ = await privacy.erase_rows(ada, tables, records)
    assert json.loads(receipt.deleted_counts_json)["profile_versions"] == 1
    assert await pool.fetchval("SELECT COUNT(*) FROM users") == 0


async def cancelled(task: asyncio.Task[object]) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return
    raise AssertionError("a blocked call finished although cancelled")


async def _no_lock_waits(pool: PostgresPool) -> bool:
    return not await waiting_on_a_lock(pool)

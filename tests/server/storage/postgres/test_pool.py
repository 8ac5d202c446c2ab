"""The pool's transactions: committed, rolled back, and left clean when cancelled."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from pulsesync.server.storage.postgres.pool import PostgresPool
from tests.support.postgres import until

DEADLINE_S = 60.0


async def _table(pool: PostgresPool) -> None:
    await pool.execute("CREATE TABLE t (k integer PRIMARY KEY, v text NOT NULL)")
    await pool.execute("INSERT INTO t VALUES (1, 'one')")


async def test_commit_and_rollback(pg_pool: PostgresPool) -> None:
    await _table(pg_pool)
    async with pg_pool.transaction() as conn:
        await conn.execute("INSERT INTO t VALUES (2, 'two')")

    async def failing() -> None:
        async with pg_pool.transaction() as conn:
            await conn.execute("INSERT INTO t VALUES (3, 'three')")
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await failing()
    assert [r["k"] for r in await pg_pool.fetch("SELECT k FROM t ORDER BY k")] == [1, 2]


async def test_failed_statement_rolls_back_and_reuses_the_connection(
    pg_pool: PostgresPool,
) -> None:
    await _table(pg_pool)
    async with pg_pool.connection() as conn:
        pid = conn.get_server_pid()

    async def conflicting() -> None:
        async with pg_pool.transaction() as conn:
            await conn.execute("INSERT INTO t VALUES (4, 'four')")
            await conn.execute("INSERT INTO t VALUES (1, 'again')")

    with pytest.raises(asyncpg.UniqueViolationError):
        await conflicting()
    async with pg_pool.connection() as conn:
        # An ordinary error does not cost the connection.
        assert conn.get_server_pid() == pid
        assert not conn.is_in_transaction()
    assert await pg_pool.fetchval("SELECT count(*) FROM t") == 1


async def test_cancelled_transaction_leaves_no_lock_and_no_open_transaction(
    pg_pool: PostgresPool,
) -> None:
    await _table(pg_pool)
    locked = asyncio.Event()
    pids: list[int] = []

    async def writer() -> None:
        async with pg_pool.transaction() as conn:
            pids.append(conn.get_server_pid())
            await conn.execute("UPDATE t SET v = 'held' WHERE k = 1")
            await conn.execute("INSERT INTO t VALUES (5, 'five')")
            locked.set()
            await conn.execute("SELECT pg_sleep(600)")  # cancelled here, mid-statement

    task = asyncio.create_task(writer())
    async with asyncio.timeout(DEADLINE_S):
        await locked.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    # The row lock is gone at once: another transaction can take it (a leaked open
    # transaction would hold it until the session ended).
    async with asyncio.timeout(DEADLINE_S), pg_pool.transaction() as conn:
        await conn.execute("SET LOCAL lock_timeout = '20s'")
        await conn.execute("UPDATE t SET v = 'mine' WHERE k = 1")
    assert await pg_pool.fetchval("SELECT v FROM t WHERE k = 1") == "mine"
    assert await pg_pool.fetchval("SELECT count(*) FROM t WHERE k = 5") == 0

    # The cancelled session is closed on the server, not returned to the pool.
    async def gone() -> bool:
        return not await pg_pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pids[0]
        )

    await until(gone, DEADLINE_S)
    for _ in range(8):  # every pooled connection is usable and outside any transaction
        async with pg_pool.connection() as conn:
            assert conn.get_server_pid() != pids[0]
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT 1") == 1


async def test_cancelled_while_waiting_for_a_lock(pg_pool: PostgresPool) -> None:
    """A task cancelled while blocked on another's lock leaves nothing queued behind it."""
    await _table(pg_pool)
    async with pg_pool.transaction() as holder:
        await holder.execute("SELECT * FROM t WHERE k = 1 FOR UPDATE")
        started = asyncio.Event()

        async def waiter() -> None:
            async with pg_pool.transaction() as conn:
                started.set()
                await conn.execute("UPDATE t SET v = 'waiter' WHERE k = 1")

        task = asyncio.create_task(waiter())
        async with asyncio.timeout(DEADLINE_S):
            await started.wait()

        async def blocked() -> bool:  # the waiter's UPDATE is really waiting for the lock
            return bool(
                await holder.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'"
                )
            )

        await until(blocked, DEADLINE_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await holder.execute("UPDATE t SET v = 'holder' WHERE k = 1")
    assert await pg_pool.fetchval("SELECT v FROM t WHERE k = 1") == "holder"

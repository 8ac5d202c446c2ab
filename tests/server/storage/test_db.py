"""The embedded database file: new files get the server's page size, existing ones keep theirs."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from pulsesync.server.storage.db import PAGE_SIZE, Database, migrate


def _page_size(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA page_size").fetchone()[0])
    finally:
        conn.close()


def test_a_new_database_gets_the_server_page_size(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    assert migrate(path)  # the schema was created
    assert _page_size(path) == PAGE_SIZE


def test_an_existing_database_keeps_its_page_size(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")  # created with SQLite's default page size
    conn.close()
    migrate(path)
    assert _page_size(path) == 4096


async def test_a_transaction_cancelled_while_waiting_for_the_lock_leaves_the_connection_clean(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db.sqlite"
    async with await Database.open(path) as db:
        other = sqlite3.connect(path, isolation_level=None, timeout=0)
        other.execute("BEGIN IMMEDIATE")  # the ingest writer, say, holds the write lock

        async def write() -> None:
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO users (name, create_us) VALUES ('x', 1)")

        task = asyncio.create_task(write())
        await asyncio.sleep(0.3)  # BEGIN IMMEDIATE is now waiting in aiosqlite's thread
        task.cancel()
        other.execute("ROLLBACK")
        other.close()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not db.writer.in_transaction
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO users (name, create_us) VALUES ('ada', 1)")
        async with db.reader.execute("SELECT name FROM users") as cur:
            assert [r[0] for r in await cur.fetchall()] == ["ada"]


async def test_a_transaction_cancelled_during_commit_commits_and_leaves_the_connection_clean(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db.sqlite"
    async with await Database.open(path) as db:
        inserted = asyncio.Event()

        async def write() -> None:
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO users (name, create_us) VALUES ('x', 1)")
                inserted.set()
            # COMMIT starts here; the cancel below lands while it runs

        task = asyncio.create_task(write())
        await inserted.wait()
        await asyncio.sleep(0)  # let the task reach the COMMIT await
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not db.writer.in_transaction
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO users (name, create_us) VALUES ('ada', 1)")
        async with db.reader.execute("SELECT name FROM users ORDER BY name") as cur:
            assert [r[0] for r in await cur.fetchall()] == ["ada", "x"]


async def test_a_cancelled_transaction_whose_begin_then_fails_is_still_cancelled(
    tmp_path: Path,
) -> None:
    # A periodic job stopped at shutdown must end even when its BEGIN fails meanwhile: a
    # swallowed cancellation left such a job sleeping for its whole period, and the stop hung.
    path = tmp_path / "db.sqlite"
    async with await Database.open(path) as db:
        await db.writer.execute("PRAGMA busy_timeout = 500")
        other = sqlite3.connect(path, isolation_level=None, timeout=0)
        other.execute("BEGIN IMMEDIATE")  # held until BEGIN below gives up (SQLITE_BUSY)
        try:

            async def write() -> None:
                async with db.transaction() as conn:
                    await conn.execute("INSERT INTO users (name, create_us) VALUES ('x', 1)")

            task = asyncio.create_task(write())
            for _ in range(20):  # into BEGIN IMMEDIATE, which waits in aiosqlite's thread
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert not db.writer.in_transaction


async def test_a_transaction_left_open_on_the_writer_is_rolled_back_before_the_next(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "db.sqlite"
    async with await Database.open(path) as db:
        await db.writer.execute("BEGIN")  # a statement outside transaction(), say
        await db.writer.execute("INSERT INTO users (name, create_us) VALUES ('stray', 1)")
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO users (name, create_us) VALUES ('ada', 1)")
        async with db.reader.execute("SELECT name FROM users") as cur:
            assert [r[0] for r in await cur.fetchall()] == ["ada"]
    assert "left open on the write connection" in caplog.text

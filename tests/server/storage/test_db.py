"""The embedded database file: new files get the server's page size, existing ones keep theirs."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from pulsesync.server.storage import db
from pulsesync.server.storage.db import PAGE_SIZE, Database, migrate
from pulsesync.server.storage.versions import Migration


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


def _migrate_to(path: Path, version: int, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = db.load_migrations()
    with monkeypatch.context() as m:
        m.setattr(db, "load_migrations", lambda: [x for x in shipped if x.version <= version])
        migrate(path)


def test_rebuilding_users_and_devices_keeps_every_row_and_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0014 rebuilds two tables others refer to (with ON DELETE CASCADE): a database with
    people, devices and their rows comes out whole, and its ids are never reused after."""
    path = tmp_path / "old.db"
    _migrate_to(path, 13, monkeypatch)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    for uid, name in ((1, "ada"), (2, "bob"), (3, "cy")):
        conn.execute("INSERT INTO users VALUES (?, ?, 0)", (uid, name))
        conn.execute(
            "INSERT INTO devices (device_pk, device_id, user_id, name, kind, token_hash, pair_us,"
            " prev_token_hash, ack_watermark) VALUES (?, ?, ?, 'phone', 1, ?, 5, ?, 4)",
            (uid * 10, f"dev_{name}", uid, name.encode() * 11, b"prev-" + name.encode()),
        )
        conn.execute(
            "INSERT INTO consent_ledger (user_id, category, granted, policy_version, device_id,"
            " change_us) VALUES (?, 1, 1, 'v1', 'admin', 1)",
            (uid,),
        )
        conn.execute("INSERT INTO nudge_push_targets VALUES (?, ?, 'tok', 1)", (uid * 10, uid))
    conn.execute("DELETE FROM users WHERE user_id = 3")  # erased before the upgrade
    before = {
        t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
        for t in ("users", "devices", "consent_ledger", "nudge_push_targets")
    }
    conn.close()

    assert migrate(path) == ["0014_ids_never_reused.sql"]

    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        for table, rows in before.items():
            assert conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall() == rows, table
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(devices)")}
        assert {"devices_by_user", "devices_by_prev_token"} <= indexes
        # The references still hold on to the rebuilt tables: erasing bob cascades.
        conn.execute("DELETE FROM users WHERE user_id = 2")
        assert conn.execute("SELECT COUNT(*) FROM devices WHERE user_id = 2").fetchone() == (0,)
        assert (
            conn.execute("SELECT COUNT(*) FROM consent_ledger WHERE user_id = 2").fetchone()[0] == 0
        )
        assert conn.execute("SELECT COUNT(*) FROM nudge_push_targets").fetchone() == (1,)
        # bob's ids (the largest left) are not given to the next person or device.
        conn.execute("INSERT INTO users (name, create_us) VALUES ('dee', 0)")
        conn.execute(
            "INSERT INTO devices (device_id, user_id, name, kind, token_hash, pair_us)"
            " SELECT 'dev_dee', user_id, 'phone', 1, x'00', 5 FROM users WHERE name = 'dee'"
        )
        dee = conn.execute("SELECT user_id FROM users WHERE name = 'dee'").fetchone()[0]
        assert dee == 3  # 3 was erased before the upgrade: unknowable, given out once more
        assert (
            conn.execute("SELECT device_pk FROM devices WHERE device_id = 'dev_dee'").fetchone()[0]
            == 21
        )
    finally:
        conn.close()


def test_a_rebuild_that_breaks_a_reference_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "db.sqlite"
    migrate(path)
    broken = Migration(
        99,
        "0099_broken.sql",
        f"{db.REBUILD_MARK}\nCREATE TABLE users_rebuilt (user_id INTEGER PRIMARY KEY, name TEXT);\n"
        "DROP TABLE users;\nALTER TABLE users_rebuilt RENAME TO users;\n",
    )
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO users VALUES (1, 'ada', 0)")
    conn.execute(
        "INSERT INTO devices (device_id, user_id, name, kind, token_hash, pair_us)"
        " VALUES ('dev_ada', 1, 'phone', 1, x'00', 5)"
    )
    conn.commit()
    conn.close()
    monkeypatch.setattr(db, "load_migrations", lambda: [broken])
    with pytest.raises(
        RuntimeError,
        match=r"0099_broken.sql would leave 1 row\(s\) .* devices rowid 1, referring to users",
    ):
        migrate(path)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT name FROM users").fetchall() == [("ada",)]
        assert conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone() == (14,)
    finally:
        conn.close()

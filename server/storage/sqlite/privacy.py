"""SQLite implementation of the privacy storage seam: schema discovery, erasure with VACUUM,
snapshot export, summary counts and chunked retention deletes."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import aiosqlite

from pulsesync.server.storage.db import BUSY_TIMEOUT_MS, Database
from pulsesync.server.storage.privacy import (
    USER_COLUMN,
    AuditRow,
    Column,
    DeviceSeen,
    ErasureRecords,
    EventGroup,
    HeldGroup,
    HeldTable,
    PersonRow,
    ReceiptRow,
    ScrubReport,
    StoredAuditRow,
    SummaryRows,
    UserTable,
    audit_params,
    nudges_sent_source,
    quote,
)

# Rows fetched per round trip to the database thread.
_FETCH_ROWS: Final = 500


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


def scrub_file(path: Path) -> ScrubReport:
    """VACUUM and truncate the WAL of the database at path (blocking; run in a thread).

    VACUUM rewrites every page, so no freed page survives in the file; the TRUNCATE
    checkpoint copies the rewritten pages home and empties the log that still held the old
    versions. A separate connection takes SQLite's own locks (waiting up to the busy timeout
    for a running transaction), so the server keeps serving meanwhile.
    """
    before = _on_disk(path)
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute("PRAGMA temp_store = MEMORY")  # no temporary file holding a copy
        t0 = time.perf_counter()
        conn.execute("VACUUM")
        t1 = time.perf_counter()
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        t2 = time.perf_counter()
    finally:
        conn.close()
    return ScrubReport(t1 - t0, t2 - t1, bool(busy), before, _on_disk(path))


def _on_disk(path: Path) -> int:
    """Bytes of the database file plus its write-ahead log."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


_AUDIT_INSERT: Final = (
    "INSERT INTO privacy_audit (at_us, action, actor, subject, detail) VALUES (?, ?, ?, ?, ?)"
)


class SqlitePrivacyStorage:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def person(self, user_id: int) -> PersonRow | None:
        async with self._db.reader.execute(
            "SELECT name, create_us FROM users WHERE user_id = ?", (user_id,)
        ) as c:
            row = await c.fetchone()
        return None if row is None else PersonRow(user_id, str(row[0]), int(row[1]))

    async def user_ids(self) -> list[int]:
        async with self._db.reader.execute("SELECT user_id FROM users ORDER BY user_id") as c:
            return [int(r[0]) for r in await c.fetchall()]

    async def user_tables(self) -> list[UserTable]:
        return await user_tables(self._db.reader)

    async def erase_rows(
        self, user_id: int, tables: list[UserTable], records: ErasureRecords
    ) -> tuple[ReceiptRow, AuditRow]:
        counts: dict[str, int] = {}
        async with self._db.transaction() as tx:
            await tx.execute("PRAGMA secure_delete = ON")
            # Components' tables may reference each other; check references at commit, when
            # all of the person's rows are gone, rather than after each statement.
            await tx.execute("PRAGMA defer_foreign_keys = ON")
            for table in tables:
                cur = await tx.execute(
                    f"DELETE FROM {quote(table.name)} WHERE {USER_COLUMN} = ?", (user_id,)
                )
                counts[table.name] = max(cur.rowcount, 0)
            receipt, audit = records(counts)
            await tx.execute(
                "INSERT INTO deletion_receipts"
                " (receipt_id, erase_us, subject_hash, deleted_counts, signature)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    receipt.receipt_id,
                    receipt.erase_us,
                    receipt.subject_hash,
                    receipt.deleted_counts_json,
                    receipt.signature,
                ),
            )
            await tx.execute(_AUDIT_INSERT, audit_params(audit))
        return receipt, audit

    async def sweep_rows(self, user_id: int, tables: list[UserTable]) -> int:
        swept = 0
        async with self._db.transaction() as tx:
            for table in tables:
                cur = await tx.execute(
                    f"DELETE FROM {quote(table.name)} WHERE {USER_COLUMN} = ?", (user_id,)
                )
                swept += max(cur.rowcount, 0)
        return swept

    async def scrub(self) -> ScrubReport | None:
        if str(self._db.path) == ":memory:":
            return None
        return await asyncio.to_thread(scrub_file, self._db.path)

    async def append_audit(self, row: AuditRow) -> None:
        async with self._db.transaction() as tx:
            await tx.execute(_AUDIT_INSERT, audit_params(row))

    async def audit_entries(self, limit: int, action: str | None) -> list[StoredAuditRow]:
        sql = "SELECT audit_id, at_us, action, actor, subject, detail FROM privacy_audit"
        params: list[object] = []
        if action:
            sql += " WHERE action = ?"
            params.append(action)
        sql += " ORDER BY audit_id DESC LIMIT ?"
        params.append(limit)
        async with self._db.reader.execute(sql, params) as c:
            rows = await c.fetchall()
        return [
            StoredAuditRow(int(r[0]), AuditRow(int(r[1]), str(r[2]), str(r[3]), str(r[4]), r[5]))
            for r in rows
        ]

    async def export_rows(
        self, user_id: int, skip: frozenset[str]
    ) -> AsyncIterator[tuple[UserTable, dict[str, object] | None]]:
        # A connection of its own, in one read transaction: a consistent snapshot across
        # tables that neither waits for nor blocks the server's writer.
        conn = await aiosqlite.connect(self._db.path, isolation_level=None)
        try:
            await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            await conn.execute("PRAGMA query_only = ON")
            await conn.execute("BEGIN")
            for table in await user_tables(conn):
                if table.name in skip:
                    continue
                yield table, None
                cols = table.exported_columns
                names = ", ".join(quote(c.name) for c in cols)
                sql = f"SELECT {names} FROM {quote(table.name)} WHERE {USER_COLUMN} = ?"
                async with conn.execute(sql, (user_id,)) as cur:
                    while rows := await cur.fetchmany(_FETCH_ROWS):
                        for row in rows:
                            yield table, {c.name: v for c, v in zip(cols, row, strict=True)}
            await conn.execute("COMMIT")
        finally:
            await conn.close()

    async def summary_rows(self, user_id: int, held: list[HeldTable]) -> SummaryRows:
        conn = self._db.reader
        async with conn.execute(
            "SELECT kind, device_pk, COUNT(*), MIN(t_us), MAX(t_us) FROM events"
            " WHERE user_id = ? GROUP BY kind, device_pk",
            (user_id,),
        ) as c:
            events = [
                EventGroup(int(k), int(d), int(n), int(lo), int(hi))
                for k, d, n, lo, hi in await c.fetchall()
            ]
        async with conn.execute(
            "SELECT device_pk, device_id, last_seen_us FROM devices WHERE user_id = ?", (user_id,)
        ) as c:
            devices = [
                DeviceSeen(int(r[0]), str(r[1]), None if r[2] is None else int(r[2]))
                for r in await c.fetchall()
            ]
        tables = await user_tables(conn)
        counts: dict[str, int] = {}
        for t in tables:
            async with conn.execute(
                f"SELECT COUNT(*) FROM {quote(t.name)} WHERE {USER_COLUMN} = ?", (user_id,)
            ) as c:
                row = await c.fetchone()
            counts[t.name] = int(row[0]) if row else 0
        present = {t.name: t for t in tables}
        groups: list[HeldGroup] = []
        for spec in held:
            table = present.get(spec.name)
            if table is None or not table.has(spec.time_column):
                continue
            device = quote(spec.device_column) if spec.device_column else "NULL"
            time_col = quote(spec.time_column)
            async with conn.execute(
                f"SELECT {device}, COUNT(*), MIN({time_col}), MAX({time_col})"
                f" FROM {quote(spec.name)} WHERE {USER_COLUMN} = ? GROUP BY 1",
                (user_id,),
            ) as c:
                groups.extend(
                    HeldGroup(spec.name, dev, int(n), int(lo), int(hi))
                    for dev, n, lo, hi in await c.fetchall()
                )
        return SummaryRows(
            events, devices, counts, groups, await self._nudges_sent(present, user_id)
        )

    async def _nudges_sent(self, present: dict[str, UserTable], user_id: int) -> int:
        source = nudges_sent_source(present)
        if source is None:
            return 0
        table, where = source
        async with self._db.reader.execute(
            f"SELECT COUNT(*) FROM {table} WHERE {USER_COLUMN} = ?{where}", (user_id,)
        ) as c:
            row = await c.fetchone()
        return int(row[0]) if row else 0

    async def _delete_chunk(self, sql: str, params: tuple[int, ...]) -> int:
        async with self._db.transaction() as tx:
            await tx.execute("PRAGMA secure_delete = ON")
            cur = await tx.execute(sql, params)
            return max(cur.rowcount, 0)

    async def delete_events_before(self, user_id: int, cutoff_us: int, limit: int) -> int:
        # Per person, so each chunk is found through events_by_user_time.
        return await self._delete_chunk(
            "DELETE FROM events WHERE (device_pk, seq) IN (SELECT device_pk, seq FROM events"
            " WHERE user_id = ? AND t_us < ? LIMIT ?)",
            (user_id, cutoff_us, limit),
        )

    async def delete_quarantine_before(self, cutoff_us: int, limit: int) -> int:
        return await self._delete_chunk(
            "DELETE FROM quarantine WHERE quarantine_id IN (SELECT quarantine_id FROM quarantine"
            " WHERE received_us < ? LIMIT ?)",
            (cutoff_us, limit),
        )

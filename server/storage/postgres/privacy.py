"""PostgreSQL implementation of the privacy storage seam: per-person tables discovered from
information_schema, erasure (rows, receipt and audit entry in one transaction), snapshot export,
summary counts, chunked retention deletes, and VACUUM of the touched tables after an erasure.

What erasure leaves behind on PostgreSQL, and why that is acceptable, is in docs/scaling.md
("Erasure on PostgreSQL"): DELETE only marks tuples dead; VACUUM (`scrub`) removes them from
the tables' pages and indexes so no query, index scan or `pageinspect` of a live tuple finds
them, and the space is reused by later rows. Copies in WAL and backups age out with their
retention; the person's profile ciphertext in them is unreadable once the key vault's row is
destroyed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Final

from pulsesync.server.storage.postgres.pool import Connection, PostgresPool
from pulsesync.server.storage.postgres.profiles import affected
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

# Rows fetched per round trip by the export cursor.
_FETCH_ROWS: Final = 500
_AUDIT_INSERT: Final = (
    "INSERT INTO privacy_audit (at_us, action, actor, subject, detail) VALUES ($1, $2, $3, $4, $5)"
)


async def user_tables(conn: Connection) -> list[UserTable]:
    """Base tables of the connection's schema with a user_id column; `users` last."""
    rows = await conn.fetch(
        "SELECT c.table_name, c.column_name, c.data_type FROM information_schema.columns c"
        " JOIN information_schema.tables t"
        " ON t.table_schema = c.table_schema AND t.table_name = c.table_name"
        " WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE'"
        " ORDER BY c.table_name, c.ordinal_position"
    )
    columns: dict[str, list[Column]] = {}
    for table, column, decl_type in rows:
        columns.setdefault(str(table), []).append(Column(str(column), str(decl_type or "")))
    found = [UserTable(name, tuple(cols)) for name, cols in columns.items()]
    found = [t for t in found if t.has(USER_COLUMN)]
    found.sort(key=lambda t: (t.name == "users", t.name))
    return found


class PostgresPrivacyStorage:
    def __init__(self, pool: PostgresPool) -> None:
        self._pool = pool

    async def person(self, user_id: int) -> PersonRow | None:
        rows = await self._pool.fetch(
            "SELECT name, create_us FROM users WHERE user_id = $1", user_id
        )
        return PersonRow(user_id, str(rows[0][0]), int(rows[0][1])) if rows else None

    async def user_ids(self) -> list[int]:
        return [int(r[0]) for r in await self._pool.fetch("SELECT user_id FROM users ORDER BY 1")]

    async def user_tables(self) -> list[UserTable]:
        async with self._pool.connection() as conn:
            return await user_tables(conn)

    async def erase_rows(
        self, user_id: int, tables: list[UserTable], records: ErasureRecords
    ) -> tuple[ReceiptRow, AuditRow]:
        counts: dict[str, int] = {}
        async with self._pool.transaction() as tx:
            # Deferrable references wait for the commit, when all of the person's rows are
            # gone; the others cascade from `users`, which is deleted last.
            await tx.execute("SET CONSTRAINTS ALL DEFERRED")
            for table in tables:
                status = await tx.execute(
                    f"DELETE FROM {quote(table.name)} WHERE {USER_COLUMN} = $1", user_id
                )
                counts[table.name] = affected(status)
            receipt, audit = records(counts)
            await tx.execute(
                "INSERT INTO deletion_receipts"
                " (receipt_id, erase_us, subject_hash, deleted_counts, signature)"
                " VALUES ($1, $2, $3, $4, $5)",
                receipt.receipt_id,
                receipt.erase_us,
                receipt.subject_hash,
                receipt.deleted_counts_json,
                receipt.signature,
            )
            await tx.execute(_AUDIT_INSERT, *audit_params(audit))
        return receipt, audit

    async def sweep_rows(self, user_id: int, tables: list[UserTable]) -> int:
        swept = 0
        async with self._pool.transaction() as tx:
            for table in tables:
                status = await tx.execute(
                    f"DELETE FROM {quote(table.name)} WHERE {USER_COLUMN} = $1", user_id
                )
                swept += affected(status)
        return swept

    async def scrub(self) -> ScrubReport | None:
        """VACUUM every per-person table: dead tuples pruned from their pages, their index
        entries removed (INDEX_CLEANUP ON, even where PostgreSQL would skip it as too few).
        Plain VACUUM takes no lock that blocks reads or writes, so replicas keep serving."""
        async with self._pool.connection() as conn:
            names = [t.name for t in await user_tables(conn)]
            before = await self._bytes(conn, names)
            t0 = time.perf_counter()
            for name in names:
                # VACUUM cannot run in a transaction: each is its own statement.
                await conn.execute(f"VACUUM (INDEX_CLEANUP ON) {quote(name)}")
            t1 = time.perf_counter()
            after = await self._bytes(conn, names)
        # No checkpoint: WAL is the cluster's and is recycled by it (docs/scaling.md).
        return ScrubReport(t1 - t0, 0.0, False, before, after)

    @staticmethod
    async def _bytes(conn: Connection, names: list[str]) -> int:
        total = await conn.fetchval(
            "SELECT COALESCE(SUM(pg_total_relation_size(format('%I', n)::regclass)), 0)"
            " FROM unnest($1::text[]) AS n",
            names,
        )
        return int(total or 0)

    async def append_audit(self, row: AuditRow) -> None:
        await self._pool.execute(_AUDIT_INSERT, *audit_params(row))

    async def audit_entries(self, limit: int, action: str | None) -> list[StoredAuditRow]:
        sql = "SELECT audit_id, at_us, action, actor, subject, detail FROM privacy_audit"
        params: list[object] = []
        if action:
            sql += " WHERE action = $1"
            params.append(action)
        sql += f" ORDER BY audit_id DESC LIMIT ${len(params) + 1}"
        params.append(limit)
        rows = await self._pool.fetch(sql, *params)
        return [
            StoredAuditRow(int(r[0]), AuditRow(int(r[1]), str(r[2]), str(r[3]), str(r[4]), r[5]))
            for r in rows
        ]

    async def export_rows(
        self, user_id: int, skip: frozenset[str]
    ) -> AsyncIterator[tuple[UserTable, dict[str, object] | None]]:
        # One read-only REPEATABLE READ transaction: a consistent snapshot across tables that
        # neither waits for nor blocks writers. An abandoned export (the client went away)
        # closes the connection, which ends the transaction on the server.
        async with self._pool.transaction(isolation="repeatable_read", readonly=True) as tx:
            for table in await user_tables(tx):
                if table.name in skip:
                    continue
                yield table, None
                cols = table.exported_columns
                names = ", ".join(quote(c.name) for c in cols)
                sql = f"SELECT {names} FROM {quote(table.name)} WHERE {USER_COLUMN} = $1"
                async for row in tx.cursor(sql, user_id, prefetch=_FETCH_ROWS):
                    yield table, {c.name: row[i] for i, c in enumerate(cols)}

    async def summary_rows(self, user_id: int, held: list[HeldTable]) -> SummaryRows:
        async with self._pool.transaction(isolation="repeatable_read", readonly=True) as tx:
            events = [
                EventGroup(int(k), int(d), int(n), int(lo), int(hi))
                for k, d, n, lo, hi in await tx.fetch(
                    "SELECT kind, device_pk, COUNT(*), MIN(t_us), MAX(t_us) FROM events"
                    " WHERE user_id = $1 GROUP BY kind, device_pk",
                    user_id,
                )
            ]
            devices = [
                DeviceSeen(int(r[0]), str(r[1]), None if r[2] is None else int(r[2]))
                for r in await tx.fetch(
                    "SELECT device_pk, device_id, last_seen_us FROM devices WHERE user_id = $1",
                    user_id,
                )
            ]
            tables = await user_tables(tx)
            counts: dict[str, int] = {}
            for t in tables:
                counts[t.name] = int(
                    await tx.fetchval(
                        f"SELECT COUNT(*) FROM {quote(t.name)} WHERE {USER_COLUMN} = $1",
                        user_id,
                    )
                )
            present = {t.name: t for t in tables}
            groups: list[HeldGroup] = []
            for spec in held:
                table = present.get(spec.name)
                if table is None or not table.has(spec.time_column):
                    continue
                device = quote(spec.device_column) if spec.device_column else "NULL"
                time_col = quote(spec.time_column)
                groups.extend(
                    HeldGroup(spec.name, dev, int(n), int(lo), int(hi))
                    for dev, n, lo, hi in await tx.fetch(
                        f"SELECT {device}, COUNT(*), MIN({time_col}), MAX({time_col})"
                        f" FROM {quote(spec.name)} WHERE {USER_COLUMN} = $1 GROUP BY 1",
                        user_id,
                    )
                )
            sent = await _nudges_sent(tx, present, user_id)
        return SummaryRows(events, devices, counts, groups, sent)

    async def delete_events_before(self, user_id: int, cutoff_us: int, limit: int) -> int:
        # Per person, so each chunk is found through events_by_user_time on one shard.
        status = await self._pool.execute(
            "DELETE FROM events WHERE user_id = $1 AND (device_pk, seq) IN"
            " (SELECT device_pk, seq FROM events WHERE user_id = $1 AND t_us < $2 LIMIT $3)",
            user_id,
            cutoff_us,
            limit,
        )
        return affected(status)

    async def delete_quarantine_before(self, cutoff_us: int, limit: int) -> int:
        status = await self._pool.execute(
            "DELETE FROM quarantine WHERE (user_id, quarantine_id) IN"
            " (SELECT user_id, quarantine_id FROM quarantine WHERE received_us < $1 LIMIT $2)",
            cutoff_us,
            limit,
        )
        return affected(status)


async def _nudges_sent(conn: Connection, present: dict[str, UserTable], user_id: int) -> int:
    source = nudges_sent_source(present)
    if source is None:
        return 0
    table, where = source
    found = await conn.fetchval(
        f"SELECT COUNT(*) FROM {table} WHERE {USER_COLUMN} = $1{where}", user_id
    )
    return int(found or 0)

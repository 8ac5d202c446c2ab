"""After an erasure and its VACUUM, no tuple of the person's is left in PostgreSQL's pages.

Read with pageinspect (the test server's user is a superuser), which sees the raw pages,
dead tuples included, as a forensic reader of the data files would.
"""

from __future__ import annotations

import json

from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.server.storage.postgres.privacy import PostgresPrivacyStorage
from pulsesync.server.storage.privacy import AuditRow, ReceiptRow

MARKER = b"ADA-HEART-RATE-7f3a"


async def tuples_holding(pool: PostgresPool, table: str, needle: bytes) -> int:
    """Line pointers of table (live or dead) whose tuple bytes contain needle."""
    return int(
        await pool.fetchval(
            "SELECT COUNT(*) FROM generate_series(0, pg_relation_size($1::text::regclass)"
            " / current_setting('block_size')::int - 1) AS blk,"
            " LATERAL heap_page_items(get_raw_page($1::text, blk::int)) AS item"
            " WHERE position($2::bytea IN item.t_data) > 0",
            table,
            needle,
        )
    )


async def test_erasure_then_vacuum_leaves_no_tuple_of_the_person(
    migrated_pool: PostgresPool,
) -> None:
    pool = migrated_pool
    await pool.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
    ada = await pool.fetchval(
        "INSERT INTO users (name, create_us) VALUES ('ada', 1) RETURNING user_id"
    )
    bob = await pool.fetchval(
        "INSERT INTO users (name, create_us) VALUES ('bob', 1) RETURNING user_id"
    )
    # Interleaved on the same pages, so VACUUM has live neighbours to keep.
    for seq in range(1, 200):
        for user_id, body in ((ada, MARKER + b"%d" % seq), (bob, b"bob-%d" % seq)):
            await pool.execute(
                "INSERT INTO events (user_id, device_pk, seq, t_us, kind, received_us, body)"
                " VALUES ($1, $2, $3, $3, 1, $3, $4)",
                user_id,
                user_id,
                seq,
                body,
            )
    assert await tuples_holding(pool, "events", MARKER) == 199
    storage = PostgresPrivacyStorage(pool)

    def records(counts: dict[str, int]) -> tuple[ReceiptRow, AuditRow]:
        detail = json.dumps(counts)
        return ReceiptRow("r", 1, "h", detail, "s"), AuditRow(1, "erase", "a", "h", detail)

    await storage.erase_rows(ada, await storage.user_tables(), records)
    # Deleted but not yet vacuumed: every tuple is still in the pages (what scrub is for).
    assert await tuples_holding(pool, "events", MARKER) == 199
    report = await storage.scrub()
    assert report is not None
    assert report.db_bytes_after > 0
    assert await tuples_holding(pool, "events", MARKER) == 0
    assert await tuples_holding(pool, "events", b"bob-") == 199
    assert await pool.fetchval("SELECT COUNT(*) FROM events WHERE user_id = $1", bob) == 199

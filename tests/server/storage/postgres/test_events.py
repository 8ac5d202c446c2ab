"""The PostgreSQL ingest writer keeps the SQLite writer's promises, against a real server."""

from __future__ import annotations

import asyncio
import itertools
import uuid

import pytest

from pulsesync.server.storage.postgres.events import PostgresEventWriter
from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.server.timeline.committer import Batch, EventRow, QuarantineRow
from pulsesync.v1 import events_pb2

NOW_US = 1_780_000_000_000_000


def event_row(user_id: int, device_pk: int, seq: int, event_id: str | None = None) -> EventRow:
    e = events_pb2.Event(event_id=event_id or str(uuid.uuid4()), seq=seq)
    e.heart_rate.bpm = 60 + seq % 40
    t = NOW_US + seq * 1000
    e.device_time.seconds, e.device_time.nanos = t // 1_000_000, (t % 1_000_000) * 1000
    return (
        user_id,
        device_pk,
        seq,
        t,
        events_pb2.EVENT_KIND_HEART_RATE,
        e.SerializeToString(),
        NOW_US,
    )


def batch(
    rows: list[EventRow],
    *,
    quarantine: list[QuarantineRow] | None = None,
    settled: list[int] | None = None,
    offset: int | None = None,
) -> Batch:
    seqs = [r[2] for r in rows]
    user_id, device_pk = (rows[0][0], rows[0][1]) if rows else (1, 1)
    return Batch(
        device_pk=device_pk,
        user_id=user_id,
        received_us=NOW_US,
        rows=rows,
        quarantine=quarantine or [],
        in_order=all(a < b for a, b in itertools.pairwise(seqs)),
        clock_offset_us=offset,
        settled=settled or [],
    )


async def add_device(pool: PostgresPool, name: str) -> tuple[int, int]:
    async with pool.transaction() as conn:
        user_id = await conn.fetchval(
            "INSERT INTO users (name, create_us) VALUES ($1, 0) RETURNING user_id", name
        )
        device_pk = await conn.fetchval(
            "INSERT INTO devices (user_id, device_id, name, kind, token_hash, pair_us)"
            " VALUES ($1, $2, 'phone', 1, $3, 0) RETURNING device_pk",
            user_id,
            f"dev_{uuid.uuid4().hex}",
            uuid.uuid4().bytes,
        )
    return int(user_id), int(device_pk)


async def stored_seqs(pool: PostgresPool, device_pk: int) -> list[int]:
    rows = await pool.fetch("SELECT seq FROM events WHERE device_pk = $1 ORDER BY seq", device_pk)
    return [int(r["seq"]) for r in rows]


async def watermark(pool: PostgresPool, device_pk: int) -> int:
    return int(
        await pool.fetchval("SELECT ack_watermark FROM devices WHERE device_pk = $1", device_pk)
    )


@pytest.fixture
async def writer(migrated_pool: PostgresPool):
    w = PostgresEventWriter(migrated_pool)
    await w.start()
    yield w
    await w.stop()


async def test_in_order_batches_are_stored_acked_after_commit_with_a_change_feed(
    migrated_pool: PostgresPool, writer: PostgresEventWriter, postgres_dsn: str
) -> None:
    user, dev = await add_device(migrated_pool, "ada")
    first = batch([event_row(user, dev, s) for s in range(1, 501)], offset=-2500)
    second = batch([event_row(user, dev, s) for s in range(501, 1001)])
    f1, f2 = writer.submit(first), writer.submit(second)
    s1 = await asyncio.wait_for(f1, 60)
    # Once acked, the rows are committed: another session (another replica) sees them.
    async with await PostgresPool.open(postgres_dsn, max_size=1) as other:
        assert (
            await other.fetchval(
                "SELECT count(*) FROM events WHERE device_pk = $1 AND seq <= 500", dev
            )
            == 500
        )
    s2 = await asyncio.wait_for(f2, 60)
    assert (s1.inserted, s1.duplicates, s1.conflicts, s1.watermark) == (None, 0, [], 500)
    assert (s2.inserted, s2.watermark) == (None, 1000)
    assert await stored_seqs(migrated_pool, dev) == list(range(1, 1001))
    assert await watermark(migrated_pool, dev) == 1000
    assert (
        await migrated_pool.fetchval(
            "SELECT clock_offset_us FROM devices WHERE device_pk = $1", dev
        )
        == -2500
    )
    changes = await migrated_pool.fetch(
        "SELECT change_id, seq_low, seq_high FROM event_changes WHERE user_id = $1 ORDER BY change_id",
        user,
    )
    assert [tuple(r) for r in changes] == [(1, 1, 500), (2, 501, 1000)]
    body = await migrated_pool.fetchval(
        "SELECT body FROM events WHERE device_pk = $1 AND seq = 7", dev
    )
    assert body == first.rows[6][5]


async def test_duplicates_conflicts_and_quarantine(
    migrated_pool: PostgresPool, writer: PostgresEventWriter
) -> None:
    user, dev = await add_device(migrated_pool, "bo")
    rows = [event_row(user, dev, s) for s in range(1, 11)]
    await writer.submit(batch(rows))
    # A resend (the ack was lost) is all duplicates; a reused seq with another event conflicts.
    impostor = event_row(user, dev, 5)
    again = await writer.submit(batch([*rows[3:6], event_row(user, dev, 11)]))
    assert (again.inserted, again.duplicates, again.conflicts) == ([3], 3, [])
    mixed = await writer.submit(batch([rows[0], impostor, event_row(user, dev, 12)]))
    assert mixed.inserted == [2]
    assert mixed.duplicates == 1
    assert [c[0] for c in mixed.conflicts] == [5]
    assert "seq 5 already holds event" in mixed.conflicts[0][2]
    assert mixed.watermark == 12
    assert await stored_seqs(migrated_pool, dev) == list(range(1, 13))
    q = await migrated_pool.fetch(
        "SELECT seq, reason, body FROM quarantine WHERE device_pk = $1", dev
    )
    assert [(r["seq"], r["reason"], r["body"]) for r in q] == [
        (5, "SEQUENCE_CONFLICT", impostor[5])
    ]
    # The stored event is the first one, untouched.
    assert (
        await migrated_pool.fetchval(
            "SELECT body FROM events WHERE device_pk = $1 AND seq = 5", dev
        )
        == rows[4][5]
    )


async def test_the_watermark_waits_for_gaps_and_counts_quarantine_and_settled_seqs(
    migrated_pool: PostgresPool, writer: PostgresEventWriter
) -> None:
    user, dev = await add_device(migrated_pool, "cy")
    s = await writer.submit(batch([event_row(user, dev, x) for x in (1, 2, 3)]))
    assert s.watermark == 3
    s = await writer.submit(batch([event_row(user, dev, x) for x in (7, 8)]))
    assert s.watermark == 3  # 4..6 not received yet
    bad: QuarantineRow = (user, dev, 5, "bad", "INVALID_EVENT", "no payload", NOW_US, b"\x00")
    s = await writer.submit(batch([event_row(user, dev, 4)], quarantine=[bad]))
    assert s.watermark == 5
    # Consent not granted for seq 6: refused for good, without a row.
    s = await writer.submit(Batch(dev, user, NOW_US, [], [], True, None, [6]))
    assert s.watermark == 8
    assert await watermark(migrated_pool, dev) == 8
    # Out of order, in one batch: stored, and the feed holds one row per run.
    s = await writer.submit(batch([event_row(user, dev, x) for x in (12, 10, 9, 11)]))
    assert s.inserted is not None
    assert sorted(s.inserted) == [0, 1, 2, 3]
    assert s.watermark == 12
    runs = await migrated_pool.fetch(
        "SELECT seq_low, seq_high FROM event_changes WHERE device_pk = $1 ORDER BY change_id", dev
    )
    assert [tuple(r) for r in runs] == [(1, 3), (7, 8), (4, 4), (9, 12)]


async def test_a_fresh_writer_reads_the_marks_from_the_database(
    migrated_pool: PostgresPool,
) -> None:
    """Nothing is trusted from memory: a second replica's writer dedupes against the first's."""
    user, dev = await add_device(migrated_pool, "di")
    rows = [event_row(user, dev, s) for s in range(1, 101)]
    a, b = PostgresEventWriter(migrated_pool), PostgresEventWriter(migrated_pool)
    await a.start()
    await b.start()
    try:
        await a.submit(batch(rows[:60]))
        s = await b.submit(batch(rows[40:]))
        assert s.duplicates == 20
        assert s.watermark == 100
    finally:
        await a.stop()
        await b.stop()
    assert await stored_seqs(migrated_pool, dev) == list(range(1, 101))


async def test_replicas_writing_the_same_devices_at_once_store_each_event_once(
    migrated_pool: PostgresPool, postgres_dsn: str
) -> None:
    """Two replicas (two pools) get overlapping resends of the same devices' events at once."""
    devices = [await add_device(migrated_pool, f"p{i}") for i in range(3)]
    events = {dev: [event_row(u, dev, s) for s in range(1, 401)] for u, dev in devices}
    pools = [await PostgresPool.open(postgres_dsn, max_size=3) for _ in range(2)]
    writers = [PostgresEventWriter(p) for p in pools]
    for w in writers:
        await w.start()
    try:
        futures = []
        for lo in range(0, 400, 50):
            for _, dev in devices:
                chunk = events[dev][max(0, lo - 25) : lo + 50]  # overlaps the previous chunk
                for w in writers:  # both replicas get every chunk
                    futures.append(w.submit(batch(chunk)))
        results = await asyncio.wait_for(asyncio.gather(*futures), 120)
        assert all(not r.conflicts for r in results)
    finally:
        for w in writers:
            await w.stop()
        for p in pools:
            await p.close()
    for user, dev in devices:
        assert await stored_seqs(migrated_pool, dev) == list(range(1, 401))
        assert await watermark(migrated_pool, dev) == 400
        runs = await migrated_pool.fetch(
            "SELECT change_id, seq_low, seq_high FROM event_changes WHERE user_id = $1 ORDER BY change_id",
            user,
        )
        # Every stored seq is in exactly one change; ids count 1, 2, 3... per person.
        assert [r["change_id"] for r in runs] == list(range(1, len(runs) + 1))
        covered = sorted(s for r in runs for s in range(r["seq_low"], r["seq_high"] + 1))
        assert covered == list(range(1, 401))


async def test_a_failing_batch_does_not_sink_its_group(
    migrated_pool: PostgresPool,
) -> None:
    user, dev = await add_device(migrated_pool, "ed")
    w = PostgresEventWriter(migrated_pool)
    good = batch([event_row(user, dev, s) for s in (1, 2)])
    # A quarantine row that PostgreSQL refuses (text with a NUL byte) fails its own batch only.
    broken = batch(
        [event_row(user, dev, 3)],
        quarantine=[(user, dev, 4, "x\x00", "INVALID_EVENT", "bad", NOW_US, b"")],
    )
    results = await w.commit_group([good, broken])
    assert not isinstance(results[0], BaseException)
    assert isinstance(results[1], BaseException)
    assert await stored_seqs(migrated_pool, dev) == [1, 2]
    assert await watermark(migrated_pool, dev) == 2


async def test_stop_commits_what_is_queued_and_refuses_after(
    migrated_pool: PostgresPool,
) -> None:
    user, dev = await add_device(migrated_pool, "fa")
    w = PostgresEventWriter(migrated_pool)
    await w.start()
    futures = [w.submit(batch([event_row(user, dev, s)])) for s in range(1, 51)]
    await w.stop()
    assert all(f.done() for f in futures)
    assert [f.result().watermark for f in futures][-1] == 50
    late = w.submit(batch([event_row(user, dev, 51)]))
    with pytest.raises(RuntimeError, match="shutting down"):
        await late


async def test_a_cancelled_caller_leaves_the_batch_whole(
    migrated_pool: PostgresPool, writer: PostgresEventWriter
) -> None:
    """The request that sent a batch goes away: the batch is committed whole or not at all,
    never in part, and the writer goes on."""
    user, dev = await add_device(migrated_pool, "gu")
    rows = [event_row(user, dev, s) for s in range(1, 2001)]
    future = writer.submit(batch(rows))
    waiter = asyncio.ensure_future(asyncio.shield(future))
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    stored = await asyncio.wait_for(future, 60)
    assert stored.watermark == 2000
    assert await stored_seqs(migrated_pool, dev) == list(range(1, 2001))
    after = await writer.submit(batch([event_row(user, dev, 2001)]))
    assert after.watermark == 2001


async def test_one_group_with_overlapping_batches_of_one_device(
    migrated_pool: PostgresPool,
) -> None:
    """Later batches of a group see the earlier ones' rows, not yet copied, as stored."""
    user, dev = await add_device(migrated_pool, "ha")
    rows = {s: event_row(user, dev, s) for s in range(1, 21)}
    impostor = event_row(user, dev, 18)
    group = [
        batch([rows[s] for s in range(1, 11)]),
        batch([rows[s] for s in range(5, 16)]),  # 5..10 resent, 11..15 new
        batch([rows[s] for s in range(16, 21)]),  # in order above the mark again
        batch([rows[3], impostor]),  # a duplicate and a conflict with this group's rows
    ]
    results = await PostgresEventWriter(migrated_pool).commit_group(group)
    assert not any(isinstance(r, BaseException) for r in results)
    _, r1, _, r3 = results
    assert not isinstance(r1, BaseException)
    assert not isinstance(r3, BaseException)
    assert (r1.inserted, r1.duplicates) == ([6, 7, 8, 9, 10], 6)
    assert (r3.inserted, r3.duplicates, [c[0] for c in r3.conflicts]) == ([], 1, [18])
    assert [r.watermark for r in results if not isinstance(r, BaseException)] == [10, 15, 20, 20]
    assert await stored_seqs(migrated_pool, dev) == list(range(1, 21))
    assert (
        await migrated_pool.fetchval(
            "SELECT body FROM events WHERE device_pk = $1 AND seq = 18", dev
        )
        == rows[18][5]
    )
    q = await migrated_pool.fetch("SELECT seq, reason FROM quarantine WHERE device_pk = $1", dev)
    assert [tuple(r) for r in q] == [(18, "SEQUENCE_CONFLICT")]

"""The identity, consent, idempotency and timeline storage seams, on both backends.

One parametrised fixture opens the same seams over SQLite and over PostgreSQL (a fresh schema
per test); every test states a promise of a Protocol docstring and must hold on both. Events
are written through each backend's ingest event writer, as the server writes them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pulsesync.server.storage.consent import ConsentStorage
from pulsesync.server.storage.db import Database
from pulsesync.server.storage.errors import DuplicateKey
from pulsesync.server.storage.idempotency import IdempotencyStorage, StoredAnswer
from pulsesync.server.storage.identity import IdentityStorage, NewDevice
from pulsesync.server.storage.postgres.consent import PostgresConsentStorage
from pulsesync.server.storage.postgres.idempotency import PostgresIdempotencyStorage
from pulsesync.server.storage.postgres.identity import PostgresIdentityStorage
from pulsesync.server.storage.postgres.ingest_writer import PostgresIngestWriter
from pulsesync.server.storage.postgres.migrate import migrate
from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.server.storage.postgres.timeline import PostgresTimelineStorage
from pulsesync.server.storage.sqlite.consent import SqliteConsentStorage
from pulsesync.server.storage.sqlite.idempotency import SqliteIdempotencyStorage
from pulsesync.server.storage.sqlite.identity import SqliteIdentityStorage
from pulsesync.server.storage.sqlite.timeline import SqliteTimelineStorage
from pulsesync.server.storage.timeline import ChangeCursor, Cursor, TimelineStorage
from pulsesync.server.timeline.writer import EventWriter, GroupCommitWriter, PendingBatch
from pulsesync.v1 import events_pb2
from tests.support.postgres import postgres_database, postgres_dsn

__all__ = ["postgres_database", "postgres_dsn"]


@dataclass
class Seams:
    identity: IdentityStorage
    consent: ConsentStorage
    idempotency: IdempotencyStorage
    timeline: TimelineStorage
    writer: EventWriter


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    """ "sqlite", or the DSN of a fresh PostgreSQL schema (set up outside the event loop)."""
    if request.param == "sqlite":
        return "sqlite"
    return str(request.getfixturevalue("postgres_dsn"))


@pytest.fixture
async def seams(backend: str, tmp_path: Path) -> AsyncIterator[Seams]:
    if backend == "sqlite":
        async with await Database.open(tmp_path / "db.sqlite") as db:
            writer = GroupCommitWriter(db)
            await writer.start()
            try:
                yield Seams(
                    SqliteIdentityStorage(db),
                    SqliteConsentStorage(db),
                    SqliteIdempotencyStorage(db),
                    SqliteTimelineStorage(db),
                    writer,
                )
            finally:
                await writer.stop()
        return
    async with await PostgresPool.open(backend, max_size=4) as pool:
        await migrate(pool)
        pg_writer = PostgresIngestWriter(pool)
        await pg_writer.start()
        try:
            yield Seams(
                PostgresIdentityStorage(pool),
                PostgresConsentStorage(pool),
                PostgresIdempotencyStorage(pool),
                PostgresTimelineStorage(pool),
                pg_writer,
            )
        finally:
            await pg_writer.stop()


async def _device(s: Seams, user: str = "ada", token: bytes = b"t" * 32) -> tuple[int, int]:
    """(user_id, device_pk) of a freshly paired device."""
    user_id = await s.identity.add_user(user, 1)
    await s.identity.add_pairing_code(b"c-" + user.encode(), user_id, 1, 100)
    paired = await s.identity.redeem_pairing_code(
        b"c-" + user.encode(), 2, NewDevice(f"dev_{user}", "phone", 1, token)
    )
    assert paired is not None
    return user_id, paired.device_pk


def _batch(user_id: int, device_pk: int, seqs: list[int], t0: int = 1000) -> PendingBatch:
    rows = [
        (
            user_id,
            device_pk,
            s,
            t0 + s,
            20,
            events_pb2.Event(event_id=f"{device_pk}-{s}", seq=s).SerializeToString(),
            500,
        )
        for s in seqs
    ]
    return PendingBatch(device_pk, user_id, 500, rows, [], seqs == sorted(set(seqs)), None)


async def test_users_are_unique_by_name(seams: Seams) -> None:
    a = await seams.identity.add_user("ada", 10)
    b = await seams.identity.add_user("bob", 11)
    assert a != b
    with pytest.raises(DuplicateKey):
        await seams.identity.add_user("ada", 12)
    assert await seams.identity.user_id_by_name("bob") == b
    assert await seams.identity.user_id_by_name("nobody") is None
    assert [(u.user_id, u.name, u.create_us) for u in await seams.identity.list_users()] == [
        (a, "ada", 10),
        (b, "bob", 11),
    ]


async def test_a_pairing_code_pairs_once_and_not_after_expiry(seams: Seams) -> None:
    user_id = await seams.identity.add_user("ada", 1)
    await seams.identity.add_pairing_code(b"code", user_id, 1, 100)
    await seams.identity.add_pairing_code(b"late", user_id, 1, 50)
    dev = NewDevice("dev_1", "phone", 1, b"h" * 32)
    assert await seams.identity.redeem_pairing_code(b"late", 51, dev) is None
    # Two redeemers at once: exactly one pairs.
    results = await asyncio.gather(
        seams.identity.redeem_pairing_code(b"code", 60, dev),
        seams.identity.redeem_pairing_code(b"code", 60, NewDevice("dev_2", "x", 1, b"i" * 32)),
    )
    paired = [r for r in results if r is not None]
    assert len(paired) == 1
    assert (paired[0].user_id, paired[0].user_name) == (user_id, "ada")
    code = await seams.identity.pairing_code(b"code")
    assert code is not None
    assert (code.user_id, code.expire_us, code.used_us) == (user_id, 100, 60)
    assert await seams.identity.pairing_code(b"unknown") is None
    # A new code drops the ones expired before now.
    await seams.identity.add_pairing_code(b"new", user_id, 101, 200)
    assert await seams.identity.pairing_code(b"code") is None


async def test_token_rotation_keeps_a_grace_for_the_replaced_token(seams: Seams) -> None:
    user_id, pk = await _device(seams, token=b"A" * 32)
    first = await seams.identity.token(b"A" * 32)
    assert first is not None
    assert (first.device_pk, first.is_current, first.issue_us, first.prev_token_expire_us) == (
        pk,
        True,
        2,
        None,
    )
    assert await seams.identity.rotate_token(pk, user_id, b"A" * 32, b"B" * 32, 10, 20) == 20
    old = await seams.identity.token(b"A" * 32)
    new = await seams.identity.token(b"B" * 32)
    assert old is not None
    assert new is not None
    assert (old.is_current, old.prev_token_expire_us) == (False, 20)
    assert (new.is_current, new.issue_us) == (True, 10)
    # Presented with the replaced token: it keeps its own grace.
    assert await seams.identity.rotate_token(pk, user_id, b"A" * 32, b"C" * 32, 11, 99) == 20
    assert await seams.identity.token(b"B" * 32) is None
    await seams.identity.revoke_device(pk, user_id, 30)
    assert await seams.identity.rotate_token(pk, user_id, b"C" * 32, b"D" * 32, 31, 40) is None
    assert await seams.identity.revoke_times([pk, pk + 1000]) == {pk: 30}
    assert await seams.identity.revoke_times([]) == {}


async def test_devices_are_listed_found_and_touched(seams: Seams) -> None:
    user_id, pk = await _device(seams)
    await seams.identity.touch_device(pk, 77)
    (listed,) = await seams.identity.list_devices(user_id)
    found = await seams.identity.get_device(user_id, "dev_ada")
    assert listed == found
    assert found is not None
    assert (found.device_pk, found.name, found.pair_us, found.last_seen_us, found.revoke_us) == (
        pk,
        "phone",
        2,
        77,
        None,
    )
    assert await seams.identity.get_device(user_id + 1, "dev_ada") is None


async def test_the_consent_ledger_is_appended_in_order(seams: Seams) -> None:
    a = await seams.identity.add_user("ada", 1)
    b = await seams.identity.add_user("bob", 1)
    assert await seams.consent.last_entry_id() == 0
    e1 = await seams.consent.append(a, 1, True, "v1", "dev", 5)
    e2 = await seams.consent.append(b, 2, True, "v1", "admin", 6)
    e3 = await seams.consent.append(a, 1, False, "v2", "dev", 7)
    assert e1 < e2 < e3
    assert await seams.consent.last_entry_id() == e3
    ledger = await seams.consent.entries(a)
    assert [(x.entry_id, x.category, x.granted, x.policy_version, x.change_us) for x in ledger] == [
        (e1, 1, True, "v1", 5),
        (e3, 1, False, "v2", 7),
    ]
    assert await seams.consent.entries_after(e1) == [(e2, b), (e3, a)]
    assert await seams.consent.entries_after(e3) == []


async def test_idempotent_answers_expire_and_are_replaced(seams: Seams) -> None:
    first = StoredAnswer("M", b"f1", b"n1", b"c1")
    await seams.idempotency.put(b"h", first, user_id=None, now_us=1, expire_us=10)
    assert await seams.idempotency.get(b"h", 9) == first
    assert await seams.idempotency.get(b"h", 10) is None
    second = StoredAnswer("M", b"f2", b"n2", b"c2")
    await seams.idempotency.put(b"h", second, user_id=None, now_us=11, expire_us=20)
    assert await seams.idempotency.get(b"h", 12) == second
    # A put drops answers that expired by its now.
    await seams.idempotency.put(b"other", first, user_id=None, now_us=25, expire_us=30)
    assert await seams.idempotency.get(b"h", 0) is None


async def test_timeline_pages_changes_counts_and_watermark(seams: Seams) -> None:
    user_id, pk = await _device(seams)
    empty = await seams.timeline.upload_state(user_id, pk)
    assert (empty.acked_through_seq, empty.last_commit_us) == (0, None)
    first = await seams.writer.submit(_batch(user_id, pk, [1, 2, 3, 4, 5]))
    assert (len(first.inserted), first.duplicates, first.watermark) == (5, 0, 5)
    # A replay with a gap: 5 is a duplicate, 7 waits for 6 before the mark moves.
    again = await seams.writer.submit(_batch(user_id, pk, [5, 7]))
    assert (len(again.inserted), again.duplicates, again.watermark) == (1, 1, 5)
    state = await seams.timeline.upload_state(user_id, pk)
    assert (state.acked_through_seq, state.last_commit_us) == (5, 500)

    events, cursor = await seams.timeline.page(user_id, 0, 10_000, None, None, None, 4)
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert cursor == Cursor(1004, pk, 4)
    events, cursor = await seams.timeline.page(user_id, 0, 10_000, None, None, cursor, 4)
    assert ([e.seq for e in events], cursor) == ([5, 7], None)
    assert events[0].event.event_id == f"{pk}-5"
    assert events[0].device_id == "dev_ada"
    filtered, _ = await seams.timeline.page(user_id, 1002, 1005, [20], ["dev_ada"], None, 10)
    assert [e.seq for e in filtered] == [2, 3, 4]
    none, _ = await seams.timeline.page(user_id, 0, 10_000, [21], None, None, 10)
    assert none == []

    changed, after, caught_up = await seams.timeline.changes(user_id, ChangeCursor(0, 0), 3)
    assert ([e.seq for e in changed], caught_up) == ([1, 2, 3], False)
    changed, after, caught_up = await seams.timeline.changes(user_id, after, 10)
    assert ([e.seq for e in changed], caught_up) == ([4, 5, 7], True)
    changed, after2, caught_up = await seams.timeline.changes(user_id, after, 10)
    assert (changed, after2, caught_up) == ([], after, True)

    assert await seams.timeline.bucket_counts(user_id, 1000, 1008, 3) == {0: 2, 1: 3, 2: 1}
    assert await seams.timeline.bucket_counts(user_id + 1, 1000, 1008, 3) == {}


async def test_a_reused_seq_is_a_conflict_and_quarantined(seams: Seams) -> None:
    user_id, pk = await _device(seams)
    await seams.writer.submit(_batch(user_id, pk, [1, 2]))
    other = _batch(user_id, pk, [2, 3])
    row = other.rows[0]
    body = events_pb2.Event(event_id="different", seq=2).SerializeToString()
    other.rows[0] = (row[0], row[1], row[2], row[3], row[4], body, row[6])
    outcome = await seams.writer.submit(other)
    assert [c.seq for c in outcome.conflicts] == [2]
    assert [r[2] for r in outcome.inserted] == [3]
    assert outcome.watermark == 3
    events, _ = await seams.timeline.page(user_id, 0, 10_000, None, None, None, 10)
    assert [e.event.event_id for e in events] == [f"{pk}-1", f"{pk}-2", f"{pk}-3"]


async def test_a_devices_batches_commit_in_arrival_order(seams: Seams) -> None:
    user_id, pk = await _device(seams)
    # Each batch is submitted once the writer has picked up the one before, as batches arrive
    # from a stream: a writer with concurrent transactions must still commit a device's
    # batches in that order, so its acks read as if committed one after the other.
    futures = []
    for round_ in range(10):
        base = round_ * 3
        for seqs in ([base + 1, base + 3], [base + 2, base + 1]):
            futures.append(seams.writer.submit(_batch(user_id, pk, seqs)))
            for _ in range(3):
                await asyncio.sleep(0)
    outcomes = await asyncio.gather(*futures)
    assert [o.watermark for o in outcomes] == [
        mark for r in range(10) for mark in (r * 3 + 1, r * 3 + 3)
    ]
    assert [o.duplicates for o in outcomes] == [0, 1] * 10

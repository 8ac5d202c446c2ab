"""The product end to end on PostgreSQL: `running_server` over a postgresql:// database.

Real gRPC on loopback, a fresh PostgreSQL schema per test: pairing, upload with its acks
(dedupe, watermark, quarantined conflicts), ListEvents, profile update reaching a watcher,
consent changes reaching a watcher and ingest, and the export archive.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import grpc
import pytest

from pulsesync.hlc import Stamp
from pulsesync.server.app import RunningServer
from pulsesync.server.clock import FakeClock
from pulsesync.server.config import load_config
from pulsesync.server.privacy.export import read_archive, records, verify_archive, write_archive
from pulsesync.server.storage.database_url import parse_database
from pulsesync.server.storage.postgres.migrate import migrate
from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.v1 import (
    common_pb2,
    ingest_pb2,
    ingest_pb2_grpc,
    privacy_pb2,
    privacy_pb2_grpc,
    profiles_pb2,
    profiles_pb2_grpc,
    timeline_pb2,
    timeline_pb2_grpc,
)
from tests.server.timeline.events import batch, heart_rate, steps, ts, upload
from tests.support.postgres import fresh_schema, postgres_database, postgres_dsn
from tests.support.server import pair_device, start_server, stored_rows

__all__ = ["postgres_database", "postgres_dsn"]

S = 1_000_000


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def pg_server(
    tmp_path: Path, postgres_dsn: str, clock: FakeClock
) -> AsyncIterator[RunningServer]:
    async with start_server(tmp_path, clock=clock, database=postgres_dsn) as running:
        yield running


async def test_the_server_runs_on_postgresql_and_not_on_a_sqlite_file(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    assert pg_server.app.sqlite is None
    assert pg_server.app.storage.pool is not None
    assert not (tmp_path / "pulsesync.db").exists()


async def test_upload_acks_after_commit_dedupes_and_quarantines_conflicts(
    pg_server: RunningServer, clock: FakeClock
) -> None:
    dev = await pair_device(pg_server, "ada")
    now = clock.now_us()
    evs = [heart_rate(seq, now - (10 - seq) * S) for seq in range(1, 7)]
    impostor = heart_rate(2, now, bpm=99)
    async with grpc.aio.insecure_channel(pg_server.address) as ch:
        acks = await upload(
            ch,
            dev.metadata,
            [
                batch(1, now, [evs[0], evs[1], evs[3]]),  # 3 waits for seq 3
                batch(2, now, [evs[2], evs[1], impostor]),  # a replay and a conflict
                batch(3, now, evs[3:]),
            ],
        )
        assert [a.acked_through_seq for a in acks] == [2, 4, 6]
        assert [a.accepted_count for a in acks] == [3, 1, 2]
        assert [a.duplicate_count for a in acks] == [0, 1, 1]
        (rejected,) = acks[1].rejected
        assert rejected.reason == ingest_pb2.REJECTION_REASON_SEQUENCE_CONFLICT
        assert rejected.event_id == impostor.event_id

        listed = await timeline_pb2_grpc.TimelineServiceStub(ch).ListEvents(
            timeline_pb2.ListEventsRequest(start_time=ts(now - 60 * S), end_time=ts(now + S)),
            metadata=dev.metadata,
            timeout=10,
        )
    assert [e.event.event_id for e in listed.events] == [e.event_id for e in evs]
    assert not listed.next_page_token
    # What the acks promised is what PostgreSQL holds.
    rows = await stored_rows(pg_server, "SELECT count(*) FROM events")
    assert rows == [(6,)]
    quarantined = await stored_rows(pg_server, "SELECT seq, reason, event_id FROM quarantine")
    assert quarantined == [(2, "SEQUENCE_CONFLICT", impostor.event_id)]
    mark = await stored_rows(
        pg_server, "SELECT ack_watermark FROM devices WHERE device_id = ?", dev.device_id
    )
    assert mark == [(6,)]


async def test_a_profile_update_reaches_the_other_devices_watch(
    pg_server: RunningServer, clock: FakeClock
) -> None:
    a = await pair_device(pg_server, "ada", kind=common_pb2.DEVICE_KIND_PHONE)
    b = await pair_device(pg_server, "ada", kind=common_pb2.DEVICE_KIND_DESKTOP)
    async with grpc.aio.insecure_channel(pg_server.address) as ch:
        stub = profiles_pb2_grpc.ProfileServiceStub(ch)
        watch: Any = stub.WatchProfile(
            profiles_pb2.WatchProfileRequest(), metadata=b.metadata, timeout=20
        )
        req = profiles_pb2.UpdateProfileRequest(base_version=0)
        req.profile.goals.daily_steps = 9000
        req.edits.add(
            field_path="goals.daily_steps",
            stamp=Stamp(clock.now_us() // 1000, 0, a.device_id).to_proto(),
        )
        resp = await stub.UpdateProfile(req, metadata=a.metadata, timeout=10)
        assert resp.committed
        got = await asyncio.wait_for(_next_with_version(watch, resp.profile.version), 15)
        assert got.profile.goals.daily_steps == 9000
        assert got.profile.update_device_id == a.device_id
        watch.cancel()
        again = await stub.GetProfile(profiles_pb2.GetProfileRequest(), metadata=b.metadata)
    assert again.profile.goals.daily_steps == 9000


async def _next_with_version(watch: Any, version: int) -> profiles_pb2.WatchProfileResponse:
    while True:
        msg = await watch.read()
        assert isinstance(msg, profiles_pb2.WatchProfileResponse)
        if msg.profile.version >= version:
            return msg


async def test_consent_changes_reach_watchers_and_ingest(
    pg_server: RunningServer, clock: FakeClock
) -> None:
    phone = await pair_device(pg_server, "ada", consents=())
    laptop = await pair_device(pg_server, "ada", kind=common_pb2.DEVICE_KIND_DESKTOP)
    now = clock.now_us()
    async with grpc.aio.insecure_channel(pg_server.address) as ch:
        stub = privacy_pb2_grpc.PrivacyServiceStub(ch)
        watch: Any = stub.WatchConsents(
            privacy_pb2.WatchConsentsRequest(), metadata=laptop.metadata, timeout=20
        )
        first = await asyncio.wait_for(watch.read(), 10)
        assert not [c for c in first.consents if c.granted]
        (refused,) = await upload(ch, phone.metadata, [batch(1, now, [steps(1, now)])])
        assert refused.accepted_count == 0
        await stub.UpdateConsent(
            privacy_pb2.UpdateConsentRequest(
                category=common_pb2.CONSENT_CATEGORY_ACTIVITY, granted=True
            ),
            metadata=phone.metadata,
            timeout=10,
        )
        change = await asyncio.wait_for(watch.read(), 10)
        assert [c.category for c in change.consents if c.granted] == [
            common_pb2.CONSENT_CATEGORY_ACTIVITY
        ]
        watch.cancel()
        (stored,) = await upload(ch, phone.metadata, [batch(2, now, [steps(2, now)])])
        assert stored.accepted_count == 1
    ledger = await stored_rows(
        pg_server, "SELECT category, granted, device_id FROM consent_ledger ORDER BY entry_id"
    )
    assert ledger[-1] == (common_pb2.CONSENT_CATEGORY_ACTIVITY, 1, phone.device_id)


async def test_export_holds_what_was_stored(
    pg_server: RunningServer, clock: FakeClock, tmp_path: Path
) -> None:
    phone = await pair_device(pg_server, "ada")
    other = await pair_device(pg_server, "bo")
    now = clock.now_us()
    async with grpc.aio.insecure_channel(pg_server.address) as ch:
        await upload(ch, phone.metadata, [batch(1, now, [heart_rate(s, now) for s in (1, 2)])])
        await upload(ch, other.metadata, [batch(1, now, [heart_rate(1, now)])])
        stub = privacy_pb2_grpc.PrivacyServiceStub(ch)
        call: Any = stub.ExportData(
            privacy_pb2.ExportDataRequest(), metadata=phone.metadata, timeout=30
        )

        async def chunks() -> AsyncIterator[tuple[str, bytes]]:
            async for msg in call:
                yield msg.file_name, msg.chunk

        names = await write_archive(chunks(), tmp_path / "ada.zip")
    assert names[-1] == "manifest.json"
    members = read_archive(tmp_path / "ada.zip")
    verify_archive(members)
    exported = records(members, "events")
    assert [e["seq"] for e in exported] == [1, 2]
    assert {d["device_id"] for d in records(members, "devices")} == {phone.device_id}
    assert isinstance(exported[0]["body"], dict)


async def test_timeline_reads_come_from_the_read_database_and_the_upload_state_from_the_primary(
    tmp_path: Path, postgres_database: str, clock: FakeClock
) -> None:
    # The "standby" is a second schema migrated like the primary; rows reach it only when the
    # test copies them, as replay would. So what ListEvents answers shows where it read.
    async with (
        fresh_schema(postgres_database) as primary_dsn,
        fresh_schema(postgres_database) as standby_dsn,
    ):
        async with await PostgresPool.open(standby_dsn) as standby:
            await migrate(standby)
        async with start_server(
            tmp_path, clock=clock, database=primary_dsn, read_database=standby_dsn
        ) as server:
            dev = await pair_device(server, "ada")
            now = clock.now_us()
            evs = [steps(seq, now - (10 - seq) * S) for seq in range(1, 4)]
            window = timeline_pb2.ListEventsRequest(
                start_time=ts(now - 60 * S), end_time=ts(now + S)
            )
            async with grpc.aio.insecure_channel(server.address) as ch:
                acks = await upload(ch, dev.metadata, [batch(1, now, evs)])
                assert acks[-1].acked_through_seq == 3
                timeline = timeline_pb2_grpc.TimelineServiceStub(ch)
                before = await timeline.ListEvents(window, metadata=dev.metadata, timeout=10)
                state = await ingest_pb2_grpc.IngestServiceStub(ch).GetUploadState(
                    ingest_pb2.GetUploadStateRequest(), metadata=dev.metadata, timeout=10
                )
                assert before.events == []  # the standby has not replayed them yet
                assert state.acked_through_seq == 3  # the resume point never lags an ack

                await _replay(
                    postgres_database, primary_dsn, standby_dsn, ("users", "devices", "events")
                )
                after = await timeline.ListEvents(window, metadata=dev.metadata, timeout=10)
            assert [e.event.event_id for e in after.events] == [e.event_id for e in evs]


async def _replay(database: str, source_dsn: str, target_dsn: str, tables: tuple[str, ...]) -> None:
    """Copy tables between the two schemas (what a standby's WAL replay would have done)."""
    source, target = (
        parse_qs(urlsplit(d).query)["search_path"][0] for d in (source_dsn, target_dsn)
    )
    conn = await asyncpg.connect(database)
    try:
        for table in tables:
            await conn.execute(f'INSERT INTO "{target}".{table} SELECT * FROM "{source}".{table}')
    finally:
        await conn.close()


async def test_a_read_only_pool_refuses_writes(postgres_dsn: str) -> None:
    async with await PostgresPool.open(postgres_dsn, read_only=True) as pool:
        assert [tuple(r) for r in await pool.fetch("SELECT 1")] == [(1,)]
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await pool.fetch("CREATE TABLE nope (x int)")


def test_a_read_database_must_be_a_postgresql_standby_of_a_postgresql_database(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PULSESYNC_READ_DATABASE", str(tmp_path / "copy.db"))
    with pytest.raises(ValueError, match=r"PULSESYNC_READ_DATABASE.*PostgreSQL standby"):
        load_config()
    monkeypatch.setenv("PULSESYNC_READ_DATABASE", "postgresql://reader@standby.internal/ps")
    sqlite_primary = load_config({"data_dir": tmp_path})
    with pytest.raises(SystemExit, match="needs --database postgresql"):
        _ = sqlite_primary.read_store
    pg_primary = load_config({"database_url": parse_database("postgresql://db.internal/ps")})
    assert pg_primary.read_store == parse_database("postgresql://reader@standby.internal/ps")

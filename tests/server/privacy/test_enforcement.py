"""Consent is enforced on the server: refused events are never stored and never reach features."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from pulsesync.server.bus import CommittedEvent
from pulsesync.server.clock import FakeClock, SystemClock
from pulsesync.server.privacy.consent import ConsentStore
from pulsesync.server.storage.db import Database
from pulsesync.server.storage.sqlite.consent import SqliteConsentStorage
from pulsesync.v1 import (
    common_pb2,
    events_pb2,
    ingest_pb2,
    ingest_pb2_grpc,
    privacy_pb2,
    privacy_pb2_grpc,
)
from tests.server.privacy.support import database_bytes
from tests.support.server import pair_device, start_server

BEHAVIOR = common_pb2.CONSENT_CATEGORY_BEHAVIOR
ACTIVITY = common_pb2.CONSENT_CATEGORY_ACTIVITY
REFUSED = ingest_pb2.REJECTION_REASON_CONSENT_NOT_GRANTED


def _ts(us: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=us % 1_000_000 * 1000)


def search_event(seq: int, t_us: int, query: str) -> events_pb2.Event:
    e = events_pb2.Event(event_id=str(uuid.uuid4()), seq=seq, device_time=_ts(t_us))
    e.search.app, e.search.query, e.search.result_count = "notes", query, 1
    return e


def heart_event(seq: int, t_us: int, sensor: str) -> events_pb2.Event:
    e = events_pb2.Event(event_id=str(uuid.uuid4()), seq=seq, device_time=_ts(t_us))
    e.heart_rate.sensor_id, e.heart_rate.bpm = sensor, 64
    return e


def request(
    batch_id: int, now_us: int, events: Sequence[events_pb2.Event]
) -> ingest_pb2.UploadRequest:
    return ingest_pb2.UploadRequest(
        batch=ingest_pb2.EventBatch(batch_id=batch_id, sent_time=_ts(now_us), events=events)
    )


async def test_refused_events_are_not_stored_and_never_reach_subscribers(tmp_path: Path) -> None:
    clock = FakeClock()
    async with start_server(tmp_path, clock=clock) as server:
        phone = await pair_device(server, "ada", consents=(BEHAVIOR,))
        seen: list[CommittedEvent] = []
        server.app.bus.subscribe(lambda _uid, events: seen.extend(events))
        now = clock.now_us()
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub: Any = ingest_pb2_grpc.IngestServiceStub(ch)
            call: Any = stub.Upload(metadata=phone.metadata, timeout=10)
            await call.write(
                request(
                    1,
                    now,
                    [
                        search_event(1, now - 3_000_000, "allowed-query"),
                        heart_event(2, now - 2_000_000, "HEART-SENSOR-NOPE"),
                        search_event(3, now - 1_000_000, "allowed-query-2"),
                    ],
                )
            )
            ack: Any = await call.read()
            await call.done_writing()
        assert ack.accepted_count == 2
        assert [(r.seq, r.reason) for r in ack.rejected] == [(2, REFUSED)]
        assert ack.acked_through_seq == 3  # refused is handled for good: the device may drop it
        async with server.app.db.reader.execute("SELECT seq, kind FROM events ORDER BY seq") as c:
            stored = list(await c.fetchall())
        assert stored == [(1, events_pb2.EVENT_KIND_SEARCH), (3, events_pb2.EVENT_KIND_SEARCH)]
        assert sorted(e.seq for e in seen) == [1, 3]
        assert all(e.kind != events_pb2.EVENT_KIND_HEART_RATE for e in seen)
        assert b"HEART-SENSOR-NOPE" not in database_bytes(server.app.db.path)


async def test_withdrawal_mid_stream_stops_storage_of_later_events(tmp_path: Path) -> None:
    clock = FakeClock()
    async with start_server(tmp_path, clock=clock) as server:
        phone = await pair_device(server, "ada", consents=(BEHAVIOR, ACTIVITY))
        laptop = await pair_device(server, "ada", kind=common_pb2.DEVICE_KIND_DESKTOP)
        seen: list[CommittedEvent] = []
        server.app.bus.subscribe(lambda _uid, events: seen.extend(events))
        now = clock.now_us()
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub: Any = ingest_pb2_grpc.IngestServiceStub(ch)
            call: Any = stub.Upload(metadata=phone.metadata, timeout=10)
            await call.write(
                request(1, now, [search_event(1, now, "before"), heart_event(2, now, "s")])
            )
            first: Any = await call.read()
            assert first.accepted_count == 2

            # withdrawn on another device while this stream stays open
            await privacy_pb2_grpc.PrivacyServiceStub(ch).UpdateConsent(
                privacy_pb2.UpdateConsentRequest(category=BEHAVIOR, granted=False),
                metadata=laptop.metadata,
                timeout=5,
            )
            await call.write(
                request(
                    2, now, [search_event(3, now, "after-withdrawal"), heart_event(4, now, "s")]
                )
            )
            second: Any = await call.read()
            assert second.accepted_count == 1
            assert [(r.seq, r.reason) for r in second.rejected] == [(3, REFUSED)]

            # withdrawn by an operator in another process (the CLI): the server picks it up
            uid = await server.app.identity.user_id_by_name("ada")
            async with await Database.open(server.app.db.path) as other:
                await ConsentStore(SqliteConsentStorage(other), SystemClock()).set(
                    uid, ACTIVITY, False, device_id="admin"
                )
            await server.app.consent.sync_external()  # what the background tick runs
            await call.write(request(3, now, [heart_event(5, now, "s")]))
            third: Any = await call.read()
            assert third.accepted_count == 0
            assert [(r.seq, r.reason) for r in third.rejected] == [(5, REFUSED)]
            await call.done_writing()

        async with server.app.db.reader.execute("SELECT seq FROM events ORDER BY seq") as c:
            assert [r[0] for r in await c.fetchall()] == [1, 2, 4]  # what came before stays
        assert sorted(e.seq for e in seen) == [1, 2, 4]
        assert b"after-withdrawal" not in database_bytes(server.app.db.path)

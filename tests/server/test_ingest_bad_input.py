"""Hostile and broken input on the ingest stream: clear errors, data intact, server healthy."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pulsesync.server.app import RunningServer
from pulsesync.server.storage.sqlite.timeline import SqliteTimelineStorage
from pulsesync.server.timeline.ingest import MAX_BATCH_EVENTS
from pulsesync.server.timeline.store import TimelineStore
from pulsesync.status import error_info
from pulsesync.v1 import events_pb2, ingest_pb2
from tests.server.timeline.events import batch, fetch, heart_rate, open_upload, request, ts, upload
from tests.support.server import PairedDevice, pair_device

UPLOAD = "/pulsesync.v1.IngestService/Upload"
YEAR_US = 365 * 86_400 * 1_000_000


async def _stored_seqs(server: RunningServer) -> list[int]:
    user_id = await server.app.identity.user_id_by_name("ada")
    now = server.app.clock.now_us()
    events = await TimelineStore(SqliteTimelineStorage(server.app.db)).events(
        user_id, now - YEAR_US, now + YEAR_US
    )
    return sorted(e.seq for e in events)


async def _assert_healthy(server: RunningServer, dev: PairedDevice, seq: int) -> None:
    async with grpc.aio.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ["", "pulsesync.v1.IngestService"]:
            resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        now = server.app.clock.now_us()
        (ack,) = await upload(ch, dev.metadata, [batch(99, now, [heart_rate(seq, now)])])
        assert (ack.accepted_count, ack.acked_through_seq) == (1, seq)


@pytest.fixture
async def ada(server: RunningServer) -> PairedDevice:
    dev = await pair_device(server, "ada")
    now = server.app.clock.now_us()
    async with grpc.aio.insecure_channel(server.address) as ch:
        (ack,) = await upload(
            ch, dev.metadata, [batch(1, now, [heart_rate(s, now) for s in (1, 2, 3)])]
        )
    assert ack.accepted_count == 3
    return dev


async def test_malformed_bytes_end_the_stream_with_a_clear_status(
    server: RunningServer, ada: PairedDevice
) -> None:
    async with grpc.aio.insecure_channel(server.address) as ch:
        raw: Any = ch.stream_stream(UPLOAD, request_serializer=None, response_deserializer=None)
        call = raw(metadata=ada.metadata, timeout=5)
        # A field 1 (batch) whose length runs past the end of the message.
        await call.write(b"\x0a\xff\xff\xff\x0f\x01")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err.value).reason == "MALFORMED_MESSAGE"  # type: ignore[union-attr]
    assert "not a valid pulsesync.v1.UploadRequest" in (err.value.details() or "")
    assert await _stored_seqs(server) == [1, 2, 3]
    await _assert_healthy(server, ada, 4)


async def test_a_malformed_unary_upload_is_invalid_argument(
    server: RunningServer, ada: PairedDevice
) -> None:
    async with grpc.aio.insecure_channel(server.address) as ch:
        raw: Any = ch.unary_unary(
            "/pulsesync.v1.IngestService/UploadBatch",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(b"\x0a\xff\xff\xff\x0f\x01", metadata=ada.metadata, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err.value).reason == "MALFORMED_MESSAGE"  # type: ignore[union-attr]
    assert "not a valid pulsesync.v1.UploadBatchRequest" in (err.value.details() or "")
    assert await _stored_seqs(server) == [1, 2, 3]
    await _assert_healthy(server, ada, 4)


async def test_a_message_over_16_mib_is_resource_exhausted(
    server: RunningServer, ada: PairedDevice
) -> None:
    now = server.app.clock.now_us()
    huge = events_pb2.Event(event_id="big", seq=4, device_time=ts(now))
    huge.search.app = "x"
    huge.search.query = "q" * (17 * 1024 * 1024)
    async with grpc.aio.insecure_channel(server.address) as ch:
        call = open_upload(ch, ada.metadata, 10)
        await call.write(request(batch(2, now, [huge])))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await _stored_seqs(server) == [1, 2, 3]
    await _assert_healthy(server, ada, 4)


async def test_a_100k_event_batch_is_refused_and_the_stream_continues(
    server: RunningServer, ada: PairedDevice
) -> None:
    now = server.app.clock.now_us()
    template = heart_rate(1, now).SerializeToString()
    big = ingest_pb2.EventBatch(batch_id=7, sent_time=ts(now))
    for seq in range(100, 100_100):
        e = big.events.add()
        e.MergeFromString(template)
        e.seq = seq
    async with grpc.aio.insecure_channel(server.address) as ch:
        call = open_upload(ch, ada.metadata, 30)
        await call.write(request(big))
        refused = await call.read()
        await call.write(request(batch(8, now, [heart_rate(4, now)])))
        accepted = await call.read()
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
    assert (refused.batch_id, refused.acked_through_seq) == (7, 0)
    assert refused.error.reason == "BATCH_TOO_LARGE"
    assert refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert f"at most {MAX_BATCH_EVENTS}" in refused.error.message
    assert (accepted.accepted_count, accepted.acked_through_seq) == (1, 4)
    assert await _stored_seqs(server) == [1, 2, 3, 4]
    await _assert_healthy(server, ada, 5)


async def test_unknown_kinds_far_future_times_and_unknown_enums_are_quarantined(
    server: RunningServer, ada: PairedDevice
) -> None:
    now = server.app.clock.now_us()
    newer_kind = events_pb2.Event.FromString(
        events_pb2.Event(event_id="k", seq=4, device_time=ts(now)).SerializeToString()
        + b"\xca\x02\x02\x08\x01"  # field 41: a payload kind this server does not know
    )
    future = heart_rate(5, now + 10 * YEAR_US)
    odd_enum = heart_rate(6, now)
    odd_enum.heart_rate.location = 77  # type: ignore[assignment]
    async with grpc.aio.insecure_channel(server.address) as ch:
        (ack,) = await upload(
            ch, ada.metadata, [batch(2, now, [newer_kind, future, odd_enum, heart_rate(7, now)])]
        )
    assert ack.acked_through_seq == 7
    assert ack.accepted_count == 1
    details = {r.seq: r.detail for r in ack.rejected}
    assert "event kind this server does not know" in details[4]
    assert "days in the future" in details[5]
    assert "heart_rate.location has the unknown value 77" in details[6]
    assert await _stored_seqs(server) == [1, 2, 3, 7]
    assert await fetch(server.app.db, "SELECT seq, reason FROM quarantine ORDER BY seq") == [
        (4, "UNKNOWN_KIND"),
        (5, "TIME_IN_FUTURE"),
        (6, "UNKNOWN_ENUM_VALUE"),
    ]
    await _assert_healthy(server, ada, 8)


async def test_acks_after_a_refused_batch_never_cover_its_events(
    server: RunningServer, ada: PairedDevice
) -> None:
    """A later accepted batch's ack stays below a refused batch's seqs until they are resent."""
    now = server.app.clock.now_us()

    def hr_batch(batch_id: int, seqs: range) -> ingest_pb2.EventBatch:
        return batch(batch_id, now, [heart_rate(s, now) for s in seqs])

    async with grpc.aio.insecure_channel(server.address) as ch:
        acks = await upload(
            ch,
            ada.metadata,
            [
                hr_batch(1, range(4, 4 + MAX_BATCH_EVENTS + 1)),  # refused: one too many
                hr_batch(2, range(5005, 5006)),  # accepted, but 4..5004 are not stored
                hr_batch(3, range(4, 2004)),  # the device resends the refused range...
                hr_batch(4, range(2004, 5005)),  # ...in smaller batches
            ],
        )
    assert acks[0].error.reason == "BATCH_TOO_LARGE"
    assert [a.acked_through_seq for a in acks] == [0, 3, 2003, 5005]
    assert await _stored_seqs(server) == [1, 2, 3, *range(4, 5006)]

"""Ingest over real loopback gRPC: merge, skew, dedupe, validation, consent, refusals."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from pulsesync.server.app import RunningServer
from pulsesync.server.bus import CommittedEvent
from pulsesync.server.clock import FakeClock
from pulsesync.server.timeline.store import TimelineStore
from pulsesync.status import error_info
from pulsesync.v1 import common_pb2, events_pb2, ingest_pb2, ingest_pb2_grpc
from tests.server.timeline.events import (
    batch,
    heart_rate,
    open_upload,
    screen_view,
    steps,
    ts,
    upload,
)
from tests.support.postgres import postgres_database, postgres_dsn
from tests.support.server import pair_device, server_database, start_server, stored_rows

__all__ = ["postgres_database", "postgres_dsn", "server_database"]

MIN_US = 60 * 1_000_000


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fake_server(tmp_path: Path, clock: FakeClock, server_database: str | None):
    # Every test here runs on both backends (server_database).
    async with start_server(tmp_path, clock=clock, database=server_database) as running:
        yield running


async def test_three_skewed_devices_merge_into_one_ordered_duplicate_free_timeline(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    server = fake_server
    rng = random.Random(7)
    kinds = [
        common_pb2.DEVICE_KIND_PHONE,
        common_pb2.DEVICE_KIND_DESKTOP,
        common_pb2.DEVICE_KIND_WEARABLE_BRIDGE,
    ]
    devices = [await pair_device(server, "ada", kind=k) for k in kinds]
    # Device clocks: 7 minutes behind, exact, 4 minutes ahead of the server.
    skews = [-7 * MIN_US, 0, 4 * MIN_US]
    t0 = clock.now_us()
    # Each device records 60 events, one every 1-3 s of true (server) time, interleaved.
    truth: dict[tuple[str, int], int] = {}
    per_device: list[list[events_pb2.Event]] = []
    for dev, skew in zip(devices, skews, strict=True):
        true_us = t0
        evs = []
        for seq in range(1, 61):
            true_us += rng.randint(1, 3) * 1_000_000 + rng.randint(0, 999)
            makers: list[Callable[[int, int], events_pb2.Event]] = [heart_rate, steps, screen_view]
            make = rng.choice(makers)
            evs.append(make(seq, true_us + skew))
            truth[(dev.device_id, seq)] = true_us
        per_device.append(evs)
    clock.set_us(t0 + 200 * 1_000_000)  # everything happened before the upload

    async with grpc.aio.insecure_channel(server.address) as ch:
        for dev, skew, evs in zip(devices, skews, per_device, strict=True):
            sent = clock.now_us() + skew
            shuffled = evs[:40]
            rng.shuffle(shuffled)  # out of order within the batches
            b1 = batch(1, sent, shuffled[:20])
            b2 = batch(2, sent, shuffled[20:] + evs[5:10])  # plus replays of b1/b2 events
            acks = await upload(ch, dev.metadata, [b1, b2])
            # the acks are contiguous watermarks: b1 holds a random half of seqs 1..40
            b1_seqs = {e.seq for e in b1.events}
            through_b1 = 0
            while through_b1 + 1 in b1_seqs:
                through_b1 += 1
            assert [a.acked_through_seq for a in acks] == [through_b1, 40]
            assert sum(a.accepted_count for a in acks) == 40
            assert sum(a.duplicate_count for a in acks) == 5
            assert all(not a.rejected for a in acks)
            assert acks[0].clock_offset.ToMicroseconds() == -skew
        # Later: the rest, then the whole history replayed once more on a fresh stream.
        clock.advance(30)
        for dev, skew, evs in zip(devices, skews, per_device, strict=True):
            acks = await upload(
                ch,
                dev.metadata,
                [batch(3, clock.now_us() + skew, evs[40:]), batch(4, clock.now_us() + skew, evs)],
            )
            assert [a.accepted_count for a in acks] == [20, 0]
            assert acks[1].duplicate_count == 60

    stored = await TimelineStore(server.app.storage.timeline).events(
        (await server.app.identity.user_id_by_name("ada")), t0 - 3600 * 1_000_000, clock.now_us()
    )
    assert len(stored) == 180
    assert len({(e.device_id, e.seq) for e in stored}) == 180
    # Corrected times equal the true times (the fake clock gives zero network delay).
    assert all(e.t_us == truth[(e.device_id, e.seq)] for e in stored)
    keys = [(e.t_us, e.device_id, e.seq) for e in stored]
    assert [k[0] for k in keys] == sorted(k[0] for k in keys)
    assert {e.device_kind for e in stored} == set(kinds)
    # The estimate was persisted for each device.
    for dev, skew in zip(devices, skews, strict=True):
        sql = "SELECT clock_offset_us FROM devices WHERE device_id = ?"
        assert await stored_rows(server, sql, dev.device_id) == [(-skew,)]


async def test_skew_estimate_is_the_minimum_of_recent_samples(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    dev = await pair_device(fake_server, "ada")
    skew = 90 * 1_000_000  # device 90 s ahead
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        offsets = []
        for i, delay_ms in enumerate([800, 40, 300]):
            sent = clock.now_us() + skew
            clock.advance(delay_ms / 1000)  # network delay
            (ack,) = await upload(ch, dev.metadata, [batch(i, sent, [heart_rate(i + 1, sent)])])
            offsets.append(ack.clock_offset.ToMicroseconds())
            clock.advance(5)
    assert offsets == [-skew + 800_000, -skew + 40_000, -skew + 40_000]


async def test_same_seq_with_a_different_id_is_quarantined_as_a_conflict(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    dev = await pair_device(fake_server, "ada")
    now = clock.now_us()
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        first = heart_rate(1, now)
        impostor = heart_rate(1, now, bpm=99)
        acks = await upload(
            ch,
            dev.metadata,
            [batch(1, now, [first]), batch(2, now, [impostor, heart_rate(2, now)])],
        )
    assert acks[1].accepted_count == 1
    (rej,) = acks[1].rejected
    assert rej.reason == ingest_pb2.REJECTION_REASON_SEQUENCE_CONFLICT
    assert rej.seq == 1
    assert rej.event_id == impostor.event_id
    assert first.event_id in rej.detail
    rows = await stored_rows(fake_server, "SELECT reason, event_id, body FROM quarantine")
    assert [(r[0], r[1]) for r in rows] == [("SEQUENCE_CONFLICT", impostor.event_id)]
    assert events_pb2.Event.FromString(rows[0][2]) == impostor


def _invalid_events(now: int) -> list[tuple[events_pb2.Event, str]]:
    cases: list[tuple[events_pb2.Event, str]] = []
    e = heart_rate(10, now)
    e.event_id = ""
    cases.append((e, "MISSING_EVENT_ID"))
    e = heart_rate(11, now)
    e.event_id = "x" * 65
    cases.append((e, "FIELD_TOO_LONG"))
    cases.append((heart_rate(0, now), "MISSING_SEQ"))
    e = heart_rate(12, now)
    e.ClearField("device_time")
    cases.append((e, "MISSING_DEVICE_TIME"))
    e = events_pb2.Event(event_id="no-payload", seq=13, device_time=ts(now))
    cases.append((e, "UNKNOWN_KIND"))
    cases.append((heart_rate(14, now, bpm=0), "VALUE_OUT_OF_RANGE"))
    cases.append((heart_rate(15, now, bpm=301), "VALUE_OUT_OF_RANGE"))
    cases.append((heart_rate(16, now, rr=[800.0, 0.0]), "VALUE_OUT_OF_RANGE"))
    cases.append((heart_rate(17, now, rr=[3500.0]), "VALUE_OUT_OF_RANGE"))
    cases.append((heart_rate(18, now, rr=[float("nan")]), "VALUE_OUT_OF_RANGE"))
    e = heart_rate(19, now)
    e.heart_rate.contact = 42  # type: ignore[assignment]
    cases.append((e, "UNKNOWN_ENUM_VALUE"))
    e = screen_view(20, now)
    e.screen_view.dwell.FromSeconds(-5)
    cases.append((e, "NEGATIVE_DURATION"))
    e = events_pb2.Event(event_id="batt", seq=21, device_time=ts(now))
    e.battery.level_percent = 101
    cases.append((e, "VALUE_OUT_OF_RANGE"))
    e = events_pb2.Event(event_id="spo2", seq=22, device_time=ts(now))
    e.oxygen_saturation.spo2_percent = 100.5
    cases.append((e, "VALUE_OUT_OF_RANGE"))
    e = screen_view(23, now, app="a" * 300)
    cases.append((e, "FIELD_TOO_LONG"))
    cases.append((heart_rate(24, now + 10 * 365 * 86_400 * 1_000_000), "TIME_IN_FUTURE"))
    cases.append((heart_rate(25, now + 6 * MIN_US), "TIME_IN_FUTURE"))
    cases.append((heart_rate(26, now - 401 * 86_400 * 1_000_000), "TIME_TOO_OLD"))
    e = events_pb2.Event(event_id="nudge", seq=27, device_time=ts(now))
    e.nudge_interaction.nudge_id = "n1"
    e.nudge_interaction.action = 9  # type: ignore[assignment]
    cases.append((e, "UNKNOWN_ENUM_VALUE"))
    # A kind from a newer client: payload field 40 is unknown here and arrives as unknown bytes.
    raw = events_pb2.Event(event_id="future-kind", seq=28, device_time=ts(now)).SerializeToString()
    e = events_pb2.Event.FromString(raw + b"\xc2\x02\x03\x08\x96\x01")  # field 40, bytes
    cases.append((e, "UNKNOWN_KIND"))
    return cases


async def test_invalid_events_are_quarantined_with_reasons_and_valid_ones_stored(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    dev = await pair_device(fake_server, "ada")
    now = clock.now_us()
    cases = _invalid_events(now)
    good = [heart_rate(1, now), steps(2, now), screen_view(30, now)]
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        (ack,) = await upload(
            ch, dev.metadata, [batch(1, now, [good[0], good[1], *(e for e, _ in cases), good[2]])]
        )
    assert ack.accepted_count == 3
    # seqs 3..9 and 29 were never sent: the ack covers 1 and 2 only
    assert ack.acked_through_seq == 2
    assert len(ack.rejected) == len(cases)
    assert all(r.reason == ingest_pb2.REJECTION_REASON_INVALID and r.detail for r in ack.rejected)
    future = next(r for r in ack.rejected if r.seq == 24)
    assert "3650 days in the future" in future.detail
    rows = await stored_rows(
        fake_server, "SELECT reason, body FROM quarantine ORDER BY quarantine_id"
    )
    assert [r[0] for r in rows] == [code for _, code in cases]
    # The raw bytes are kept, unknown fields included.
    assert rows[-1][1] == cases[-1][0].SerializeToString()
    assert b"\xc2\x02" in rows[-1][1]
    metrics = fake_server.app.metrics
    assert metrics.ingest_events.labels("invalid")._value.get() == len(cases)
    assert metrics.quarantined.labels("UNKNOWN_KIND")._value.get() == 2


async def test_batch_refusals_keep_the_stream_open(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    dev = await pair_device(fake_server, "ada")
    now = clock.now_us()
    stub_requests = [
        ingest_pb2.UploadRequest(),  # no batch
        ingest_pb2.UploadRequest(
            batch=ingest_pb2.EventBatch(batch_id=2, events=[heart_rate(1, now)])
        ),
        ingest_pb2.UploadRequest(
            batch=ingest_pb2.EventBatch(batch_id=3, sent_time=ts(now))
        ),  # ping
        ingest_pb2.UploadRequest(batch=batch(4, now, [heart_rate(1, now)])),
    ]
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        call = open_upload(ch, dev.metadata, 10)
        acks = []
        for r in stub_requests:
            await call.write(r)
            acks.append(await call.read())
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
    assert [a.error.reason for a in acks] == ["MISSING_BATCH", "MISSING_SENT_TIME", "", ""]
    assert acks[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "sent_time" in acks[1].error.message
    assert [a.acked_through_seq for a in acks] == [0, 0, 0, 1]
    assert [a.batch_id for a in acks] == [0, 2, 3, 4]
    assert acks[3].accepted_count == 1


async def test_consent_withdrawal_mid_stream_stops_storage_for_later_batches(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    dev = await pair_device(fake_server, "ada")
    app = fake_server.app
    user_id = await app.identity.user_id_by_name("ada")
    now = clock.now_us()
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        call = open_upload(ch, dev.metadata, 10)
        await call.write(
            ingest_pb2.UploadRequest(batch=batch(1, now, [heart_rate(1, now), screen_view(2, now)]))
        )
        first = await call.read()
        await app.consent.set(
            user_id, common_pb2.CONSENT_CATEGORY_ACTIVITY, False, device_id=dev.device_id
        )
        await call.write(
            ingest_pb2.UploadRequest(batch=batch(2, now, [heart_rate(3, now), screen_view(4, now)]))
        )
        second = await call.read()
        await call.done_writing()
    assert first.accepted_count == 2
    assert second.accepted_count == 1
    assert second.acked_through_seq == 4
    (rej,) = second.rejected
    assert (rej.seq, rej.reason) == (3, ingest_pb2.REJECTION_REASON_CONSENT_NOT_GRANTED)
    assert await stored_rows(fake_server, "SELECT seq FROM events ORDER BY seq") == [
        (1,),
        (2,),
        (4,),
    ]
    assert await stored_rows(fake_server, "SELECT count(*) FROM quarantine") == [(0,)]
    assert app.metrics.ingest_events.labels("consent_not_granted")._value.get() == 1


async def test_revoking_the_device_ends_its_upload_stream_unauthenticated(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    dev = await pair_device(fake_server, "ada")
    now = clock.now_us()
    user_id = await fake_server.app.identity.user_id_by_name("ada")
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        call = open_upload(ch, dev.metadata, 10)
        await call.write(ingest_pb2.UploadRequest(batch=batch(1, now, [heart_rate(1, now)])))
        assert (await call.read()).accepted_count == 1
        device = await fake_server.app.identity.revoke(user_id, dev.device_id)
        fake_server.app.sessions.cut_off_device(device.device_pk)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info = error_info(err.value)
        assert info is not None
        assert info.reason == "DEVICE_REVOKED"


async def test_a_new_stream_from_the_same_device_replaces_the_older_one(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    dev = await pair_device(fake_server, "ada")
    now = clock.now_us()
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        old = open_upload(ch, dev.metadata)
        await old.write(ingest_pb2.UploadRequest(batch=batch(1, now, [heart_rate(1, now)])))
        assert (await old.read()).acked_through_seq == 1
        acks = await upload(ch, dev.metadata, [batch(2, now, [heart_rate(2, now)])])
        assert acks[0].acked_through_seq == 2
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await old.read()
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert error_info(err.value).reason == "UPLOAD_STREAM_REPLACED"  # type: ignore[union-attr]


async def test_upload_batch_unary_goes_through_the_same_pipeline(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    dev = await pair_device(fake_server, "ada")
    seen: list[tuple[int, list[CommittedEvent]]] = []
    fake_server.app.bus.subscribe(lambda uid, evs: seen.append((uid, list(evs))))
    now = clock.now_us()
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        stub = ingest_pb2_grpc.IngestServiceStub(ch)
        e = heart_rate(1, now)
        resp = await stub.UploadBatch(
            ingest_pb2.UploadBatchRequest(batch=batch(1, now, [e])),
            metadata=dev.metadata,
            timeout=5,
        )
        again = await stub.UploadBatch(
            ingest_pb2.UploadBatchRequest(batch=batch(2, now, [e])),
            metadata=dev.metadata,
            timeout=5,
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UploadBatch(
                ingest_pb2.UploadBatchRequest(batch=ingest_pb2.EventBatch(events=[e])),
                metadata=dev.metadata,
                timeout=5,
            )
    assert (resp.ack.accepted_count, resp.ack.acked_through_seq) == (1, 1)
    assert (again.ack.accepted_count, again.ack.duplicate_count) == (0, 1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err.value).reason == "MISSING_SENT_TIME"  # type: ignore[union-attr]
    user_id = await fake_server.app.identity.user_id_by_name("ada")
    assert len(seen) == 1
    assert seen[0][0] == user_id
    (committed,) = seen[0][1]
    assert (committed.seq, committed.kind, committed.t_us) == (
        1,
        events_pb2.EVENT_KIND_HEART_RATE,
        now,
    )
    assert events_pb2.Event.FromString(committed.body) == e


async def test_unauthenticated_upload_is_refused(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    call = open_upload(channel, None, 5)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

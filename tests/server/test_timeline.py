"""TimelineService over loopback gRPC: order, pagination, filters, late arrivals, summaries."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from pulsesync.server.app import RunningServer
from pulsesync.server.clock import FakeClock
from pulsesync.server.storage.sqlite.timeline import SqliteTimelineStorage
from pulsesync.server.timeline.store import TimelineStore
from pulsesync.status import error_info
from pulsesync.v1 import common_pb2, events_pb2, timeline_pb2, timeline_pb2_grpc
from tests.server.timeline.events import batch, heart_rate, screen_view, steps, ts, upload
from tests.support.server import PairedDevice, pair_device, start_server

S = 1_000_000
HOUR = 3600 * S


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fake_server(tmp_path: Path, clock: FakeClock):
    async with start_server(tmp_path, clock=clock) as running:
        yield running


def _stub(ch: grpc.aio.Channel) -> Any:
    return timeline_pb2_grpc.TimelineServiceStub(ch)


async def _list_all(ch: grpc.aio.Channel, dev: PairedDevice, **fields: Any) -> list[Any]:
    out: list[Any] = []
    token = ""
    for _ in range(100):
        resp = await _stub(ch).ListEvents(
            timeline_pb2.ListEventsRequest(page_token=token, **fields),
            metadata=dev.metadata,
            timeout=5,
        )
        out.extend(resp.events)
        token = resp.next_page_token
        if not token:
            return out
    raise AssertionError("pagination did not end")


async def test_pages_walk_the_merged_order_and_late_arrivals_land_in_place(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    phone = await pair_device(fake_server, "ada", kind=common_pb2.DEVICE_KIND_PHONE)
    band = await pair_device(fake_server, "ada", kind=common_pb2.DEVICE_KIND_WEARABLE_BRIDGE)
    t0 = clock.now_us() - HOUR
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        # Same instants on both devices (ties broken by device, then seq), every 10 s.
        await upload(
            ch,
            phone.metadata,
            [batch(1, clock.now_us(), [screen_view(i, t0 + i * 10 * S) for i in range(1, 31)])],
        )
        await upload(
            ch,
            band.metadata,
            [batch(1, clock.now_us(), [heart_rate(i, t0 + i * 10 * S) for i in range(1, 41, 2)])],
        )
        # The band's even seqs arrive late and out of order.
        late = [heart_rate(i, t0 + i * 10 * S) for i in range(40, 1, -2)]
        await upload(ch, band.metadata, [batch(2, clock.now_us(), late)])
        req = {"start_time": ts(t0), "end_time": ts(clock.now_us()), "page_size": 7}
        events = await _list_all(ch, phone, **req)
    assert len(events) == 70
    keys = [(e.time.ToMicroseconds(), e.device_id, e.event.seq) for e in events]
    pk_of = {phone.device_id: 0, band.device_id: 1}  # the phone was paired first
    assert keys == sorted(keys, key=lambda k: (k[0], pk_of[k[1]], k[2]))
    band_seqs = [e.event.seq for e in events if e.device_id == band.device_id]
    assert band_seqs == list(range(1, 41))
    assert {e.device_kind for e in events} == {
        common_pb2.DEVICE_KIND_PHONE,
        common_pb2.DEVICE_KIND_WEARABLE_BRIDGE,
    }


async def test_filters_and_page_size_limits(fake_server: RunningServer, clock: FakeClock) -> None:
    phone = await pair_device(fake_server, "ada")
    band = await pair_device(fake_server, "ada", kind=common_pb2.DEVICE_KIND_WEARABLE_BRIDGE)
    now = clock.now_us()
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        await upload(
            ch,
            phone.metadata,
            [batch(1, now, [screen_view(1, now - 5 * S), steps(2, now - 4 * S)])],
        )
        await upload(
            ch, band.metadata, [batch(1, now, [heart_rate(i, now - 3 * S) for i in range(1, 1201)])]
        )
        rng: dict[str, Any] = {"start_time": ts(now - HOUR), "end_time": ts(now + S)}
        only_steps = await _list_all(ch, band, kinds=[events_pb2.EVENT_KIND_STEPS], **rng)
        only_phone = await _list_all(ch, band, device_ids=[phone.device_id], **rng)
        default = await _stub(ch).ListEvents(
            timeline_pb2.ListEventsRequest(**rng), metadata=band.metadata, timeout=5
        )
        capped = await _stub(ch).ListEvents(
            timeline_pb2.ListEventsRequest(page_size=5000, **rng), metadata=band.metadata, timeout=5
        )
    assert [e.event.WhichOneof("payload") for e in only_steps] == ["steps"]
    assert [e.event.seq for e in only_phone] == [1, 2]
    assert len(default.events) == 200
    assert len(capped.events) == 1000
    assert capped.next_page_token


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"end_time": ts(HOUR)}, "MISSING_TIME_RANGE"),
        ({"start_time": ts(HOUR)}, "MISSING_TIME_RANGE"),
        ({"start_time": ts(2 * HOUR), "end_time": ts(HOUR)}, "INVALID_TIME_RANGE"),
        ({"start_time": ts(0), "end_time": ts(HOUR), "page_size": -1}, "INVALID_PAGE_SIZE"),
        ({"start_time": ts(0), "end_time": ts(HOUR), "kinds": [99]}, "INVALID_KIND"),
        (
            {"start_time": ts(0), "end_time": ts(HOUR), "page_token": "not-a-token"},
            "INVALID_PAGE_TOKEN",
        ),
    ],
)
async def test_bad_list_requests_are_invalid_argument(
    server: RunningServer, channel: grpc.aio.Channel, fields: dict[str, Any], reason: str
) -> None:
    dev = await pair_device(server, "ada")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _stub(channel).ListEvents(
            timeline_pb2.ListEventsRequest(**fields), metadata=dev.metadata, timeout=5
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err.value).reason == reason  # type: ignore[union-attr]


async def test_a_page_token_only_works_for_its_own_query(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    dev = await pair_device(fake_server, "ada")
    now = clock.now_us()
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        await upload(
            ch, dev.metadata, [batch(1, now, [heart_rate(i, now - i * S) for i in range(1, 6)])]
        )
        first = await _stub(ch).ListEvents(
            timeline_pb2.ListEventsRequest(
                start_time=ts(now - HOUR), end_time=ts(now), page_size=2
            ),
            metadata=dev.metadata,
            timeout=5,
        )
        assert first.next_page_token
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _stub(ch).ListEvents(
                timeline_pb2.ListEventsRequest(
                    start_time=ts(now - 2 * HOUR),
                    end_time=ts(now),
                    page_token=first.next_page_token,
                ),
                metadata=dev.metadata,
                timeout=5,
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "different query" in (err.value.details() or "")


async def test_users_see_only_their_own_timeline(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    ada = await pair_device(fake_server, "ada")
    bo = await pair_device(fake_server, "bo")
    now = clock.now_us()
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        await upload(ch, ada.metadata, [batch(1, now, [heart_rate(1, now - S)])])
        rng: dict[str, Any] = {"start_time": ts(now - HOUR), "end_time": ts(now + S)}
        assert len(await _list_all(ch, ada, **rng)) == 1
        assert await _list_all(ch, bo, **rng) == []
        assert await _list_all(ch, bo, device_ids=[ada.device_id], **rng) == []


async def test_summarize_activity_buckets(fake_server: RunningServer, clock: FakeClock) -> None:
    phone = await pair_device(fake_server, "ada")
    band = await pair_device(fake_server, "ada", kind=common_pb2.DEVICE_KIND_WEARABLE_BRIDGE)
    start = clock.now_us() - 2 * HOUR
    start -= start % HOUR
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        await upload(ch, band.metadata, [batch(1, clock.now_us(), [
            heart_rate(1, start + 60 * S, bpm=60, rr=[1000.0, 1010.0]),
            heart_rate(2, start + 120 * S, bpm=80, rr=[990.0]),
            steps(3, start + 300 * S, count=120),
            steps(4, start + HOUR + 10 * S, count=30),
        ])])  # fmt: skip
        await upload(ch, phone.metadata, [batch(1, clock.now_us(), [
            screen_view(1, start + 200 * S, app="reader", dwell_s=40),
            screen_view(2, start + 400 * S, app="reader", dwell_s=20),
            screen_view(3, start + HOUR + 5 * S, app="maps", dwell_s=15),
        ])])  # fmt: skip
        resp = await _stub(ch).SummarizeActivity(
            timeline_pb2.SummarizeActivityRequest(
                start_time=ts(start),
                end_time=ts(start + 2 * HOUR),
                bucket=duration_pb2.Duration(seconds=3600),
            ),
            metadata=phone.metadata,
            timeout=5,
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _stub(ch).SummarizeActivity(
                timeline_pb2.SummarizeActivityRequest(
                    start_time=ts(start),
                    end_time=ts(start + HOUR),
                    bucket=duration_pb2.Duration(seconds=10),
                ),
                metadata=phone.metadata,
                timeout=5,
            )
    assert error_info(err.value).reason == "INVALID_BUCKET"  # type: ignore[union-attr]
    first, second = resp.buckets
    assert first.start_time.ToMicroseconds() == start
    assert (first.steps, first.event_count) == (120, 5)
    assert first.mean_heart_rate_bpm == pytest.approx(70.0)
    # One sensor's RR series 1000, 1010, 990: successive differences 10 and -20.
    assert first.hrv_rmssd_ms == pytest.approx(math.sqrt((100 + 400) / 2))
    assert first.app_time["reader"].ToSeconds() == 60
    assert (second.steps, second.event_count, second.mean_heart_rate_bpm) == (30, 2, 0.0)
    assert second.app_time["maps"].ToSeconds() == 15

    store = TimelineStore(SqliteTimelineStorage(fake_server.app.db))
    user_id = await fake_server.app.identity.user_id_by_name("ada")
    py = await store.summarize(user_id, start, start + 2 * HOUR, HOUR)
    assert [b.steps for b in py] == [120, 30]
    hr = await store.events(
        user_id, start, start + 2 * HOUR, kinds={events_pb2.EVENT_KIND_HEART_RATE}
    )
    assert [(e.device_id, e.seq, e.event.heart_rate.bpm) for e in hr] == [
        (band.device_id, 1, 60),
        (band.device_id, 2, 80),
    ]

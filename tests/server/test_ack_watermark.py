"""The upload ack is a contiguous watermark: every seq at or below it is handled for good."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from pulsesync.server.app import RunningServer
from pulsesync.server.clock import FakeClock
from pulsesync.v1 import common_pb2, events_pb2, ingest_pb2, ingest_pb2_grpc
from tests.server.timeline.events import batch, heart_rate, screen_view, upload
from tests.support.postgres import postgres_database, postgres_dsn
from tests.support.server import (
    PairedDevice,
    pair_device,
    server_database,
    start_server,
)

__all__ = ["postgres_database", "postgres_dsn", "server_database"]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fake_server(tmp_path: Path, clock: FakeClock):  # type: ignore[no-untyped-def]
    async with start_server(tmp_path, clock=clock) as running:
        yield running


def beats(seqs: range | list[int], now: int) -> list[events_pb2.Event]:
    return [heart_rate(seq, now) for seq in seqs]


async def send(
    ch: grpc.aio.Channel, dev: PairedDevice, batch_id: int, events: list[events_pb2.Event], now: int
) -> ingest_pb2.UploadResponse:
    stub = ingest_pb2_grpc.IngestServiceStub(ch)
    resp = await stub.UploadBatch(
        ingest_pb2.UploadBatchRequest(batch=batch(batch_id, now, events)),
        metadata=dev.metadata,
        timeout=60,
    )
    assert not resp.ack.HasField("error"), resp.ack.error
    return resp.ack


async def upload_state(ch: grpc.aio.Channel, dev: PairedDevice) -> int:
    stub = ingest_pb2_grpc.IngestServiceStub(ch)
    state = await stub.GetUploadState(
        ingest_pb2.GetUploadStateRequest(), metadata=dev.metadata, timeout=30
    )
    return state.acked_through_seq


async def test_a_batch_past_a_gap_is_not_acked_past_the_gap(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    dev = await pair_device(fake_server, "ada")
    now = clock.now_us()
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        await send(ch, dev, 1, beats(range(1, 5001), now), now)
        first = await send(ch, dev, 4, beats(range(5001, 5243), now), now)
        ahead = await send(ch, dev, 2, beats([5343], now), now)
        assert (first.acked_through_seq, ahead.acked_through_seq) == (5242, 5242)
        assert await upload_state(ch, dev) == 5242
        # the gap filled: the mark jumps over the seq received ahead of it
        filled = await send(ch, dev, 3, beats(range(5243, 5343), now), now)
        assert filled.acked_through_seq == 5343
        assert await upload_state(ch, dev) == 5343


async def test_a_batch_resent_second_half_first_is_acked_whole_once_both_arrived(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    dev = await pair_device(fake_server, "ada")
    now = clock.now_us()
    events = beats(range(1, 5002), now)
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        acks = await upload(
            ch, dev.metadata, [batch(1, now, events[2500:]), batch(2, now, events[:2500])]
        )
        assert [a.acked_through_seq for a in acks] == [0, 5001]
        assert [a.accepted_count for a in acks] == [2501, 2500]
        assert await upload_state(ch, dev) == 5001


async def test_a_gap_is_never_acked_past(fake_server: RunningServer, clock: FakeClock) -> None:
    dev = await pair_device(fake_server, "ada")
    now = clock.now_us()
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        acks = [
            await send(ch, dev, 1, beats([1, 2, 3], now), now),
            await send(ch, dev, 2, beats([5, 6], now), now),
            await send(ch, dev, 3, beats([8, 9, 10], now), now),
            # a duplicate and an invalid event (quarantined) do not fill seq 4
            await send(ch, dev, 4, [*beats([2], now), heart_rate(7, now, bpm=0)], now),
        ]
        assert [a.acked_through_seq for a in acks] == [3, 3, 3, 3]
        assert acks[3].rejected[0].seq == 7
        assert await upload_state(ch, dev) == 3
        # seq 4 arrives: 5, 6, the quarantined 7 and 8-10 are all handled
        last = await send(ch, dev, 5, beats([4], now), now)
        assert last.acked_through_seq == 10
        assert await upload_state(ch, dev) == 10


async def test_events_refused_for_consent_count_as_handled(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    dev = await pair_device(fake_server, "ada", consents=(common_pb2.CONSENT_CATEGORY_ACTIVITY,))
    now = clock.now_us()
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        ack = await send(
            ch, dev, 1, [heart_rate(1, now), screen_view(2, now), *beats([3], now)], now
        )
        assert [r.reason for r in ack.rejected] == [ingest_pb2.REJECTION_REASON_CONSENT_NOT_GRANTED]
        assert ack.acked_through_seq == 3
        assert await upload_state(ch, dev) == 3


async def test_upload_state_equals_the_last_ack_after_a_restart(
    tmp_path: Path, clock: FakeClock, server_database: str | None
) -> None:
    async with start_server(tmp_path, clock=clock, database=server_database) as server:
        dev = await pair_device(server, "ada")
        now = clock.now_us()
        async with grpc.aio.insecure_channel(server.address) as ch:
            await send(ch, dev, 1, beats([1, 2], now), now)
            last = await send(ch, dev, 2, beats([4, 5], now), now)
            assert last.acked_through_seq == 2
            assert await upload_state(ch, dev) == last.acked_through_seq
    # a new server (and writer process) picks up the mark and the seqs held above it
    async with (
        start_server(tmp_path, clock=clock, database=server_database) as server,
        grpc.aio.insecure_channel(server.address) as ch,
    ):
        assert await upload_state(ch, dev) == 2
        filled = await send(ch, dev, 3, beats([3], now), now)
        assert filled.acked_through_seq == 5
        assert await upload_state(ch, dev) == 5

"""One device cannot hold more than HEAVY_READS_PER_DEVICE heavy reads, nor read more rows than
its budget; others are unaffected."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pulsesync.server.app import RunningServer
from pulsesync.server.clock import FakeClock
from pulsesync.server.limits import (
    BURST_ROWS,
    FULL_PAGE_ROWS,
    HEAVY_READS_PER_DEVICE,
    MAX_WAIT_S,
    ROWS_PER_S,
    HeavyReads,
    ReadRateLimited,
)
from pulsesync.server.rpc.base import error_info
from pulsesync.server.rpc.timeline import TimelineServicer
from pulsesync.v1 import timeline_pb2, timeline_pb2_grpc
from tests.support.server import PairedDevice, pair_device, start_server


def _request() -> timeline_pb2.ListEventsRequest:
    req = timeline_pb2.ListEventsRequest(page_size=1000)
    req.start_time.FromSeconds(0)
    req.end_time.FromSeconds(10**9)
    return req


async def test_heavy_reads_are_limited_per_device(
    server: RunningServer, channel: grpc.aio.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    flooder = await pair_device(server, "ada")
    other = await pair_device(server, "bob")
    servicer = server.servicers["pulsesync.v1.TimelineService"]
    assert isinstance(servicer, TimelineServicer)
    real_page = servicer.store.page
    release = asyncio.Event()
    entered = 0
    all_entered = asyncio.Event()

    async def slow_page(user_id: int, *args: object, **kwargs: object) -> object:
        nonlocal entered
        entered += 1
        if entered >= HEAVY_READS_PER_DEVICE:
            all_entered.set()
        await release.wait()
        return await real_page(user_id, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(servicer.store, "page", slow_page)
    stub = timeline_pb2_grpc.TimelineServiceStub(channel)
    held = [
        stub.ListEvents(_request(), metadata=flooder.metadata, timeout=60)
        for _ in range(HEAVY_READS_PER_DEVICE)
    ]
    async with asyncio.timeout(60):  # only bounds a hang
        await all_entered.wait()

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.ListEvents(_request(), metadata=flooder.metadata, timeout=60)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(e.value)
    assert info is not None
    assert info.reason == "TOO_MANY_CONCURRENT_READS"

    # another person's device is not refused
    other_call = stub.ListEvents(_request(), metadata=other.metadata, timeout=60)
    release.set()
    await other_call
    await asyncio.gather(*held)
    # the slots are given back
    await stub.ListEvents(_request(), metadata=flooder.metadata, timeout=60)


def _retry_delay_s(err: grpc.aio.AioRpcError) -> float | None:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToMicroseconds()) / 1e6
    return None


def test_the_row_budget_refills_on_the_injected_clock() -> None:
    reads = HeavyReads(rows_per_s=1000, burst_rows=3000)
    t = 1_000_000_000
    assert [reads.reserve(1, 1000, t) for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert reads.reserve(1, 400, t) == pytest.approx(0.4)  # a short wait for budget to come
    with pytest.raises(ReadRateLimited) as e:
        reads.reserve(1, 1000, t)  # would wait 1.4 s: refused, charging nothing
    assert e.value.retry_delay_s == pytest.approx(1.4 - MAX_WAIT_S)
    assert reads.reserve(2, 1000, t) == 0.0  # another device has its own budget
    # One second of the clock later: 1000 rows came back, 400 of them were promised.
    assert reads.reserve(1, 600, t + 1_000_000) == 0.0
    assert reads.reserve(1, 100, t + 1_000_000) == pytest.approx(0.1)
    # Refilled, but never past the burst.
    assert reads.reserve(1, 3000, t + 100_000_000) == 0.0
    assert reads.reserve(1, 1, t + 100_000_000) == pytest.approx(0.001)


async def test_a_device_reading_past_its_row_budget_is_paced_then_refused(
    tmp_path: Path,
) -> None:
    clock = FakeClock()  # still unless advanced: the budget refills only when told
    async with start_server(tmp_path, clock=clock) as server:
        flooder = await pair_device(server, "ada")
        other = await pair_device(server, "bob")
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = timeline_pb2_grpc.TimelineServiceStub(ch)

            async def read(dev: PairedDevice) -> None:
                await stub.ListEvents(_request(), metadata=dev.metadata, timeout=60)

            for _ in range(BURST_ROWS // FULL_PAGE_ROWS):
                await read(flooder)
            # Past the burst: two more pages wait for budget that comes within MAX_WAIT_S,
            # then the next is held and refused with when to come back.
            await read(flooder)
            await read(flooder)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await read(flooder)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            info = error_info(e.value)
            assert info is not None
            assert info.reason == "READ_RATE_LIMITED"
            delay = _retry_delay_s(e.value)
            assert delay is not None
            assert 0 < delay <= 3 * FULL_PAGE_ROWS / ROWS_PER_S
            # another person's device is not paced
            await read(other)
            # After the RetryInfo delay and the waits promised before it, the device reads
            # again; small pages are charged their size only.
            clock.advance(delay + 3 * FULL_PAGE_ROWS / ROWS_PER_S)
            await read(flooder)
            small = timeline_pb2.ListEventsRequest(page_size=20)
            small.start_time.FromSeconds(0)
            small.end_time.FromSeconds(10**9)
            for _ in range(20):
                await stub.ListEvents(small, metadata=flooder.metadata, timeout=60)

"""One device cannot hold more than HEAVY_READS_PER_DEVICE heavy reads; others are unaffected."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pulsesync.server.app import RunningServer
from pulsesync.server.limits import HEAVY_READS_PER_DEVICE
from pulsesync.server.rpc.base import error_info
from pulsesync.server.rpc.timeline import TimelineServicer
from pulsesync.v1 import timeline_pb2, timeline_pb2_grpc
from tests.support.server import pair_device


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

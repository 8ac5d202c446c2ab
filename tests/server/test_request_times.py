"""Out-of-range timestamps in a request's time range are INVALID_ARGUMENT, never a crash."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from pulsesync.server.app import RunningServer
from pulsesync.server.rpc.base import error_info
from pulsesync.v1 import nudges_pb2, nudges_pb2_grpc, timeline_pb2, timeline_pb2_grpc
from tests.support.server import pair_device

BIG = 2**62
# (start seconds, end seconds): each holds at least one value no Timestamp may carry.
RANGES = [(-BIG, 0), (0, BIG), (-BIG, BIG), (0, 253_402_300_800), (-62_135_596_801, 0)]


def _ts(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


@pytest.mark.parametrize(("start", "end"), RANGES)
async def test_out_of_range_times_are_invalid_argument_on_every_time_range(
    server: RunningServer, channel: grpc.aio.Channel, start: int, end: int
) -> None:
    dev = await pair_device(server, "ada")
    timeline: Any = timeline_pb2_grpc.TimelineServiceStub(channel)
    nudges: Any = nudges_pb2_grpc.NudgeServiceStub(channel)
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: timeline.ListEvents(
            timeline_pb2.ListEventsRequest(start_time=_ts(start), end_time=_ts(end)),
            metadata=dev.metadata,
            timeout=10,
        ),
        lambda: timeline.SummarizeActivity(
            timeline_pb2.SummarizeActivityRequest(start_time=_ts(start), end_time=_ts(end)),
            metadata=dev.metadata,
            timeout=10,
        ),
        lambda: nudges.ListNudges(
            nudges_pb2.ListNudgesRequest(start_time=_ts(start), end_time=_ts(end)),
            metadata=dev.metadata,
            timeout=10,
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call()
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value.details()
        info = error_info(exc.value)
        assert info is not None
        assert info.reason == "INVALID_TIMESTAMP"


async def test_nanos_out_of_range_are_invalid_argument(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    dev = await pair_device(server, "ada")
    timeline: Any = timeline_pb2_grpc.TimelineServiceStub(channel)
    bad = timestamp_pb2.Timestamp(seconds=10, nanos=-1)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await timeline.ListEvents(
            timeline_pb2.ListEventsRequest(start_time=bad, end_time=_ts(100)),
            metadata=dev.metadata,
            timeout=10,
        )
    info = error_info(exc.value)
    assert info is not None
    assert info.reason == "INVALID_TIMESTAMP"

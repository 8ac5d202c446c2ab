"""Builders of ingest events and batches for tests and the benchmark."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import timestamp_pb2

from pulsesync.v1 import events_pb2, ingest_pb2, ingest_pb2_grpc


def ts(us: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


def heart_rate(
    seq: int, device_us: int, bpm: int = 70, rr: Sequence[float] = ()
) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=str(uuid.uuid4()),
        seq=seq,
        device_time=ts(device_us),
        heart_rate=events_pb2.HeartRate(sensor_id="AA:BB", bpm=bpm, rr_intervals_ms=list(rr)),
    )


def steps(seq: int, device_us: int, count: int = 10) -> events_pb2.Event:
    e = events_pb2.Event(event_id=str(uuid.uuid4()), seq=seq, device_time=ts(device_us))
    e.steps.count = count
    e.steps.interval.FromSeconds(60)
    return e


def screen_view(
    seq: int, device_us: int, app: str = "reader", dwell_s: int = 30
) -> events_pb2.Event:
    e = events_pb2.Event(event_id=str(uuid.uuid4()), seq=seq, device_time=ts(device_us))
    e.screen_view.app = app
    e.screen_view.screen = "home"
    e.screen_view.dwell.FromSeconds(dwell_s)
    return e


def batch(batch_id: int, sent_us: int, events: Iterable[events_pb2.Event]) -> ingest_pb2.EventBatch:
    return ingest_pb2.EventBatch(batch_id=batch_id, sent_time=ts(sent_us), events=list(events))


def request(b: ingest_pb2.EventBatch) -> ingest_pb2.UploadRequest:
    return ingest_pb2.UploadRequest(batch=b)


def open_upload(channel: Any, metadata: Any, timeout: float = 10) -> Any:
    """A new Upload stream call (typed loosely: the grpc stubs do not model aio streams)."""
    stub: Any = ingest_pb2_grpc.IngestServiceStub(channel)
    return stub.Upload(metadata=metadata, timeout=timeout)


async def upload(
    channel: Any, metadata: Any, batches: Sequence[ingest_pb2.EventBatch]
) -> list[ingest_pb2.UploadResponse]:
    """Send batches on one Upload stream, half-close, and return every ack."""
    call = open_upload(channel, metadata, timeout=30)
    for b in batches:
        await call.write(request(b))
    await call.done_writing()
    return [resp async for resp in call]


async def fetch(db: Any, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """All rows of a read query on the server's read connection."""
    async with db.reader.execute(sql, args) as c:
        return [tuple(r) for r in await c.fetchall()]

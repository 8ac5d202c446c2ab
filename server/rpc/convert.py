"""Conversions between storage values (integer microseconds) and protobuf messages."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2

from pulsesync.server.identity import DeviceRecord
from pulsesync.v1 import common_pb2, devices_pb2


def ts(us: int) -> timestamp_pb2.Timestamp:
    """A Timestamp from integer microseconds since the epoch."""
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


def us_of(t: timestamp_pb2.Timestamp) -> int:
    """Integer microseconds since the epoch of a Timestamp."""
    return t.seconds * 1_000_000 + t.nanos // 1000


def duration(us: int) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMicroseconds(us)
    return d


def device_message(d: DeviceRecord) -> devices_pb2.Device:
    msg = devices_pb2.Device(
        device_id=d.device_id,
        name=d.name,
        kind=common_pb2.DeviceKind.ValueType(d.kind),
        pair_time=ts(d.pair_us),
    )
    if d.last_seen_us is not None:
        msg.last_seen_time.CopyFrom(ts(d.last_seen_us))
    if d.revoke_us is not None:
        msg.revoke_time.CopyFrom(ts(d.revoke_us))
    return msg

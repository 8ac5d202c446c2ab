"""parse_upload: each event's bytes as sent, beside the parsed batch, in the same order."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError

from pulsesync.server.timeline.received import parse_upload
from pulsesync.v1 import ingest_pb2
from tests.server.timeline.events import batch, heart_rate, screen_view, steps, ts

NOW_US = 1_790_000_000_000_000


def test_bodies_are_the_events_bytes_in_order() -> None:
    events = [heart_rate(1, NOW_US, rr=[800.0]), steps(2, NOW_US), screen_view(3, NOW_US)]
    raw = ingest_pb2.UploadRequest(batch=batch(7, NOW_US, events)).SerializeToString()
    received = parse_upload(raw, ingest_pb2.UploadRequest)
    assert received.batch is not None
    assert (received.batch.batch_id, list(received.batch.events)) == (7, events)
    assert received.bodies == [e.SerializeToString() for e in events]


def test_a_batch_sent_in_two_parts_merges_the_same_way() -> None:
    # Protobuf merges a message field that appears twice: the second part's events follow
    # the first part's, in the parsed batch and in the bodies alike.
    first = ingest_pb2.UploadRequest(batch=batch(7, NOW_US, [heart_rate(1, NOW_US)]))
    second = ingest_pb2.UploadRequest(batch=batch(7, NOW_US, [steps(2, NOW_US)]))
    raw = first.SerializeToString() + second.SerializeToString()
    received = parse_upload(raw, ingest_pb2.UploadRequest)
    assert received.batch is not None
    assert [e.seq for e in received.batch.events] == [1, 2]
    assert received.bodies == [e.SerializeToString() for e in received.batch.events]


def _length_delimited(field: int, payload: bytes) -> bytes:
    out = bytearray([field << 3 | 2])
    n = len(payload)
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + payload


def test_bodies_keep_the_bytes_as_sent() -> None:
    # A field this server does not know, placed before the known ones: re-encoding the parsed
    # event would move it last; the body is what the device sent.
    unknown = b"\xf8\x3f\x01"  # field 1023, varint 1
    as_sent = unknown + heart_rate(1, NOW_US).SerializeToString()
    head = ingest_pb2.EventBatch(batch_id=1, sent_time=ts(NOW_US)).SerializeToString()
    events_field = ingest_pb2.EventBatch.DESCRIPTOR.fields_by_name["events"].number
    raw = _length_delimited(1, head + _length_delimited(events_field, as_sent))
    received = parse_upload(raw, ingest_pb2.UploadRequest)
    assert received.batch is not None
    (event,) = received.batch.events
    assert event.seq == 1
    assert event.SerializeToString() != as_sent
    assert received.bodies == [as_sent]


def test_no_batch_and_malformed_bytes() -> None:
    assert parse_upload(b"", ingest_pb2.UploadBatchRequest).batch is None
    with pytest.raises(DecodeError):
        parse_upload(b"\x0a\xff\xff\xff\x0f\x01", ingest_pb2.UploadRequest)

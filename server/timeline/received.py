"""An upload request as received: the parsed batch and each event's bytes exactly as sent.

The server stores every event as the bytes its device sent. Serializing each parsed event
again costs more than any other step of validating it, so the request's bytes are parsed a
second time by a message that reads the same wire format with each event left as bytes: a
message field and a bytes field are both length-delimited on the wire, so upb splits the
events out in C without building them.

    received = parse_upload(raw, ingest_pb2.UploadRequest)   # raises DecodeError
    received.batch.events[i]   # the parsed event
    received.bodies[i]         # its bytes as the device sent them
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from pulsesync.v1 import ingest_pb2

_BATCH_FIELD: Final = ingest_pb2.UploadRequest.DESCRIPTOR.fields_by_name["batch"].number
_EVENTS_FIELD: Final = ingest_pb2.EventBatch.DESCRIPTOR.fields_by_name["events"].number
# Both upload requests carry their batch in the same field, so one bodies message reads both.
assert ingest_pb2.UploadBatchRequest.DESCRIPTOR.fields_by_name["batch"].number == _BATCH_FIELD


def _bodies_message() -> type[Message]:
    """{batch = _BATCH_FIELD: {repeated bytes events = _EVENTS_FIELD}}, in a pool of its own."""
    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="pulsesync/server/received.proto", package="pulsesync.server", syntax="proto3"
    )
    batch = file.message_type.add(name="BatchBodies")
    batch.field.add(name="events", number=_EVENTS_FIELD, type=f.TYPE_BYTES, label=f.LABEL_REPEATED)
    request = file.message_type.add(name="RequestBodies")
    request.field.add(
        name="batch",
        number=_BATCH_FIELD,
        type=f.TYPE_MESSAGE,
        type_name=".pulsesync.server.BatchBodies",
        label=f.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("pulsesync.server.RequestBodies")
    )


_RequestBodies: Final = _bodies_message()


@dataclass(frozen=True, slots=True)
class Received:
    """A request's batch (None when it has none) and its events' bytes, in the same order."""

    batch: ingest_pb2.EventBatch | None
    bodies: list[bytes]


def parse_upload(
    raw: bytes,
    request_type: type[ingest_pb2.UploadRequest] | type[ingest_pb2.UploadBatchRequest],
) -> Received:
    """Parse an UploadRequest or UploadBatchRequest; DecodeError when the bytes are not one."""
    request = request_type.FromString(raw)
    if not request.HasField("batch"):
        return Received(None, [])
    # The same bytes parse the same way: the same merges of repeated batch fields, the same
    # events in the same order.
    bodies: Any = _RequestBodies.FromString(raw)
    return Received(request.batch, bodies.batch.events[:])

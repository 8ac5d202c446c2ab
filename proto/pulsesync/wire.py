"""Wire conventions shared by the server and its clients, beyond the protobuf messages."""

from __future__ import annotations

from typing import Final

# Initial metadata the server sends on every stream as soon as it has authenticated the
# caller. A client that writes to a stream (IngestService.Upload) waits for it before its first
# write: writing while the server is refusing the stream races the refusal, and grpc.aio then
# reports INTERNAL ("Internal error from Core") instead of the server's status
# (grpc/grpc#36066). Without the entry, the stream is over and its status is the reason.
STREAM_OPEN: Final = ("pulsesync-stream", "open")

# gRPC's default of 4 MiB is raised so a full ingest batch always fits with headroom, while a
# runaway message is still refused by gRPC. Both ends use the same ceiling.
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024

# The most events one ingest batch may carry. An agent sends a few hundred; 5000 keeps one
# batch's validation (~10-20 ms) from stalling other streams on the server's event loop and its
# serialized size (a few hundred KiB) far below MAX_MESSAGE_BYTES, while leaving a backlog room
# to drain fast. The server refuses a larger batch; the agent never builds one.
MAX_BATCH_EVENTS: Final = 5000

MESSAGE_SIZE_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)

# Keep idle device streams alive through NATs: an agent pings an idle stream every 30 s (and
# notices a dead peer within ~40 s); the server pings at the same rate and permits the agents'.
KEEPALIVE_TIME_MS: Final = 30_000
KEEPALIVE_TIMEOUT_MS: Final = 10_000
KEEPALIVE_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
)

"""Wire conventions shared by the server and its clients, beyond the protobuf messages."""

from __future__ import annotations

from typing import Final

# Initial metadata the server sends on every stream as soon as it has authenticated the
# caller. A client that writes to a stream (IngestService.Upload) waits for it before its first
# write: writing while the server is refusing the stream races the refusal, and grpc.aio then
# reports INTERNAL ("Internal error from Core") instead of the server's status
# (grpc/grpc#36066). Without the entry, the stream is over and its status is the reason.
STREAM_OPEN: Final = ("pulsesync-stream", "open")

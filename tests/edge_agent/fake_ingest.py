"""A fake IngestService on a real grpc.aio server (127.0.0.1:0) for failure injection.

It follows the server's contract: per-device dedupe on seq, one response per batch after
"storing", acked_through_seq = the batch's highest seq, BATCH_TOO_LARGE refusals. Knobs drop
streams after a number of batches (stored but not acknowledged), refuse chosen batches,
delay acks, or refuse the token.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

from pulsesync.edge_agent.client import Credentials
from pulsesync.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc
from pulsesync.wire import STREAM_OPEN

TOKEN = "fake-device-token"


class FakeIngest(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, *, max_batch: int = 5000, ack_delay_s: float = 0.0) -> None:
        self.max_batch = max_batch
        self.ack_delay_s = ack_delay_s
        self.token = TOKEN
        self.stored: dict[int, str] = {}  # seq -> event_id
        # seq -> (device_time, the batch's sent_time) in µs, as last received
        self.times: dict[int, tuple[int, int]] = {}
        self.conflicts: list[int] = []
        self.on_wire: Counter[int] = Counter()  # how often each seq arrived
        self.batch_sizes: list[int] = []
        self.streams = 0
        # Per stream, in order: drop the stream (UNAVAILABLE) after storing this many batches.
        self.drop_after: list[int] = []
        # Refuse these batch ids (once each) as too large, whatever their size.
        self.refuse_batch_ids: set[int] = set()
        self.changed = asyncio.Event()

    async def Upload(
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[ingest_pb2.UploadResponse]:
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "device token revoked")
        await context.send_initial_metadata((STREAM_OPEN,))
        self.streams += 1
        drop = self.drop_after.pop(0) if self.drop_after else None
        handled = 0
        async for request in request_iterator:
            batch = request.batch
            self.batch_sizes.append(len(batch.events))
            if len(batch.events) > self.max_batch or batch.batch_id in self.refuse_batch_ids:
                self.refuse_batch_ids.discard(batch.batch_id)
                yield ingest_pb2.UploadResponse(
                    batch_id=batch.batch_id,
                    error=common_pb2.ErrorDetail(
                        code=3, reason="BATCH_TOO_LARGE", message="send smaller batches"
                    ),
                )
                continue
            for e in batch.events:
                self.on_wire[e.seq] += 1
                self.times[e.seq] = (
                    e.device_time.ToMicroseconds(),
                    batch.sent_time.ToMicroseconds(),
                )
                known = self.stored.setdefault(e.seq, e.event_id)
                if known != e.event_id:
                    self.conflicts.append(e.seq)
            self.changed.set()
            handled += 1
            if drop is not None and handled > drop:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "injected: stream dropped")
            if self.ack_delay_s:
                await asyncio.sleep(self.ack_delay_s)
            yield ingest_pb2.UploadResponse(
                batch_id=batch.batch_id,
                acked_through_seq=max((e.seq for e in batch.events), default=0),
                accepted_count=len(batch.events),
            )

    async def UploadBatch(
        self, request: ingest_pb2.UploadBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.UploadBatchResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the agent streams; not used here")
        raise AssertionError("unreachable")

    async def GetUploadState(
        self,
        request: ingest_pb2.GetUploadStateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ingest_pb2.GetUploadStateResponse:
        return ingest_pb2.GetUploadStateResponse(acked_through_seq=max(self.stored, default=0))

    async def wait_stored(self, n: int, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.stored) < n:
                self.changed.clear()
                await self.changed.wait()


@asynccontextmanager
async def fake_ingest_server(fake: FakeIngest) -> AsyncIterator[str]:
    """Serve fake on 127.0.0.1:0; yields the address."""
    server = grpc.aio.server()
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def credentials_for(address: str, token: str = TOKEN) -> Credentials:
    return Credentials(server=address, device_id="dev_fake", token=token)

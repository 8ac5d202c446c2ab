"""IngestService: the bidi upload stream of event batches, and a unary convenience call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import grpc
from google.protobuf.message import DecodeError

from pulsesync.server.context import RpcContext
from pulsesync.server.errors import Aborted, InvalidArgument
from pulsesync.server.identity import Identity
from pulsesync.server.rpc.base import Idempotent, rpc_method
from pulsesync.server.timeline.ingest import IngestPipeline, Prepared
from pulsesync.server.timeline.received import parse_upload
from pulsesync.server.timeline.store import TimelineStore
from pulsesync.v1 import ingest_pb2, ingest_pb2_grpc

log = logging.getLogger(__name__)

# Batches a stream may have between receipt and ack. Eight 500-event batches keep the writer
# busy across a commit (the next group is ready when the last one lands) while bounding the
# memory one stream can pin to 8 x 5000 events.
STREAM_WINDOW: Final = 8


class _Replaced:
    """Queued into an older stream when a newer one from the same device opens."""


class _Ended:
    """The device half-closed the stream (or it failed, with error set)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


@dataclass(frozen=True, slots=True)
class _Batch:
    """A prepared batch with the range of sequence numbers it carried."""

    prepared: Prepared
    low: int
    high: int


_Item = _Batch | _Replaced | _Ended


class _RefusedRange:
    """Keeps acks honest after a refused batch.

    An ack promises that *every* event of the device up to `acked_through_seq` is handled.
    When a batch is refused (nothing stored) and a later batch is accepted, the later batch's
    highest seq would break that promise for the refused seqs; so acks stay below the refused
    range until batches covering it from its start are accepted.
    """

    def __init__(self) -> None:
        self.low: int | None = None  # first seq of the refused range not yet handled
        self.high = 0
        self.withheld = 0  # the highest ack held back while the range was open

    def refused(self, low: int, high: int) -> None:
        self.low = low if self.low is None else min(self.low, low)
        self.high = max(self.high, high)

    def cap(self, ack: int, low: int, high: int) -> int:
        """The ack to send for an accepted batch of seqs [low, high] whose own ack is `ack`."""
        if self.low is None or ack == 0:
            return ack
        if low <= self.low:  # the device resent from the refused point
            self.low = max(self.low, high + 1)
            if self.low > self.high:
                # Every refused seq is handled now, and everything below the acks held
                # back meanwhile was stored.
                self.low, ack, self.withheld = None, max(ack, self.withheld), 0
                return ack
        self.withheld = max(self.withheld, ack)
        return min(ack, self.low - 1)


class _Stream:
    """One open Upload stream: the queue between its reader and its responder."""

    def __init__(self) -> None:
        self.refused = _RefusedRange()
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.window = asyncio.Semaphore(STREAM_WINDOW)
        self.reader: asyncio.Task[None] | None = None

    def replace(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        self.queue.put_nowait(_Replaced())


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, rpc: RpcContext, pipeline: IngestPipeline, timeline: TimelineStore) -> None:
        self.rpc = rpc
        self.pipeline = pipeline
        self.timeline = timeline
        self._streams: dict[int, _Stream] = {}

    @rpc_method(stream=True)
    async def Upload(
        self, request_iterator: Any, context: Any, me: Identity
    ) -> AsyncIterator[ingest_pb2.UploadResponse]:
        stream = _Stream()
        older = self._streams.get(me.device_pk)
        if older is not None:
            # Batches of one device must be handled in order: only its newest stream reads.
            older.replace()
        self._streams[me.device_pk] = stream
        stream.reader = asyncio.create_task(self._read(me, request_iterator, stream))
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, _Replaced):
                    raise Aborted(
                        "a newer Upload stream from this device replaced this one; "
                        "unacknowledged batches are handled there",
                        reason="UPLOAD_STREAM_REPLACED",
                    )
                if isinstance(item, _Ended):
                    if item.error is not None:
                        raise item.error
                    return
                response = await self.pipeline.finish(me, item.prepared)
                stream.window.release()
                if item.prepared.refusal is not None:
                    if item.high:
                        stream.refused.refused(item.low, item.high)
                else:
                    response.acked_through_seq = stream.refused.cap(
                        response.acked_through_seq, item.low, item.high
                    )
                yield response
        finally:
            if self._streams.get(me.device_pk) is stream:
                del self._streams[me.device_pk]
            stream.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stream.reader

    async def _read(self, me: Identity, requests: Any, stream: _Stream) -> None:
        """Validate batches in arrival order and queue them for the responder."""
        try:
            async for raw in requests:
                await stream.window.acquire()
                received_us = self.rpc.clock.now_us()
                received = parse_upload(raw, ingest_pb2.UploadRequest)
                prepared = await self.pipeline.prepare(me, received, received_us)
                batch = received.batch
                if prepared.refusal is not None and batch is not None and batch.events:
                    # A refused batch was not read event by event: its range is needed to
                    # hold acks below it (see _RefusedRange).
                    seqs = [e.seq for e in batch.events]
                    low, high = min(seqs), max(seqs)
                else:
                    low, high = prepared.seq_range
                stream.queue.put_nowait(_Batch(prepared, low, high))
        except asyncio.CancelledError:
            raise
        except DecodeError:
            stream.queue.put_nowait(
                _Ended(
                    InvalidArgument(
                        "a message on the stream is not a valid pulsesync.v1.UploadRequest; "
                        "check the client's protobuf encoding (batches acked before it are stored)",
                        reason="MALFORMED_MESSAGE",
                    )
                )
            )
        except Exception as e:
            stream.queue.put_nowait(_Ended(e))
        else:
            stream.queue.put_nowait(_Ended())

    @rpc_method(idempotent=Idempotent())
    async def UploadBatch(
        self, raw: bytes, context: Any, me: Identity
    ) -> ingest_pb2.UploadBatchResponse:
        try:
            received = parse_upload(raw, ingest_pb2.UploadBatchRequest)
        except DecodeError:
            raise InvalidArgument(
                "the request is not a valid pulsesync.v1.UploadBatchRequest; "
                "check the client's protobuf encoding",
                reason="MALFORMED_MESSAGE",
            ) from None
        prepared = await self.pipeline.prepare(me, received, self.rpc.clock.now_us())
        if prepared.refusal is not None:
            raise InvalidArgument(prepared.refusal.message, reason=prepared.refusal.reason)
        return ingest_pb2.UploadBatchResponse(ack=await self.pipeline.finish(me, prepared))

    @rpc_method()
    async def GetUploadState(
        self, request: ingest_pb2.GetUploadStateRequest, context: Any, me: Identity
    ) -> ingest_pb2.GetUploadStateResponse:
        state = await self.timeline.upload_state(me.user_id, me.device_pk)
        resp = ingest_pb2.GetUploadStateResponse(acked_through_seq=state.acked_through_seq)
        if state.last_commit_us is not None:
            resp.last_commit_time.FromMicroseconds(state.last_commit_us)
        return resp


def add_to_server(servicer: IngestServicer, server: Any) -> None:
    """Register IngestService like the generated add_IngestServiceServicer_to_server, except
    that the requests reach the servicer as bytes: the pipeline keeps each event's bytes as
    sent (see timeline/received.py), and a malformed request gets a clear INVALID_ARGUMENT."""
    handlers = {
        "Upload": grpc.stream_stream_rpc_method_handler(
            servicer.Upload,
            request_deserializer=None,
            response_serializer=ingest_pb2.UploadResponse.SerializeToString,
        ),
        "UploadBatch": grpc.unary_unary_rpc_method_handler(
            servicer.UploadBatch,
            request_deserializer=None,
            response_serializer=ingest_pb2.UploadBatchResponse.SerializeToString,
        ),
        "GetUploadState": grpc.unary_unary_rpc_method_handler(
            servicer.GetUploadState,
            request_deserializer=ingest_pb2.GetUploadStateRequest.FromString,
            response_serializer=ingest_pb2.GetUploadStateResponse.SerializeToString,
        ),
    }
    service = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"]
    assert set(handlers) == set(service.methods_by_name), "every method needs a handler"
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)

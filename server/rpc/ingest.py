"""IngestService: the bidi upload stream of event batches."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pulsesync.server.context import AppContext
from pulsesync.server.errors import Unimplemented
from pulsesync.server.identity import Identity
from pulsesync.server.rpc.base import rpc_method
from pulsesync.v1 import ingest_pb2, ingest_pb2_grpc


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, app: AppContext) -> None:
        self.app = app

    @rpc_method(stream=True)
    async def Upload(
        self, request_iterator: Any, context: Any, me: Identity
    ) -> AsyncIterator[ingest_pb2.UploadResponse]:
        raise Unimplemented("ingest is not available yet")
        yield  # pragma: no cover

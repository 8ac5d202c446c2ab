"""NudgeService: context-aware nudges delivered to the device in use, and their feedback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pulsesync.server.context import AppContext
from pulsesync.server.errors import Unimplemented
from pulsesync.server.identity import Identity
from pulsesync.server.rpc.base import rpc_method
from pulsesync.v1 import nudges_pb2, nudges_pb2_grpc

_NOT_YET = "nudges are not available in this server version yet"


class NudgeServicer(nudges_pb2_grpc.NudgeServiceServicer):
    def __init__(self, app: AppContext) -> None:
        self.app = app

    @rpc_method(stream=True)
    async def SubscribeNudges(
        self, request: Any, context: Any, me: Identity
    ) -> AsyncIterator[nudges_pb2.SubscribeNudgesResponse]:
        raise Unimplemented(_NOT_YET)
        yield  # pragma: no cover

    @rpc_method()
    async def RecordNudgeFeedback(
        self, request: Any, context: Any, me: Identity
    ) -> nudges_pb2.RecordNudgeFeedbackResponse:
        raise Unimplemented(_NOT_YET)

    @rpc_method()
    async def ListNudges(
        self, request: Any, context: Any, me: Identity
    ) -> nudges_pb2.ListNudgesResponse:
        raise Unimplemented(_NOT_YET)

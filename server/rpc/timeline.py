"""TimelineService: the calling user's merged, corrected-time timeline."""

from __future__ import annotations

from typing import Any

from pulsesync.server.context import AppContext
from pulsesync.server.errors import Unimplemented
from pulsesync.server.identity import Identity
from pulsesync.server.rpc.base import rpc_method
from pulsesync.v1 import timeline_pb2, timeline_pb2_grpc


class TimelineServicer(timeline_pb2_grpc.TimelineServiceServicer):
    def __init__(self, app: AppContext) -> None:
        self.app = app

    @rpc_method()
    async def ListEvents(
        self, request: Any, context: Any, me: Identity
    ) -> timeline_pb2.ListEventsResponse:
        raise Unimplemented("timeline is not available yet")

    @rpc_method()
    async def SummarizeActivity(
        self, request: Any, context: Any, me: Identity
    ) -> timeline_pb2.SummarizeActivityResponse:
        raise Unimplemented("activity summaries are not available yet")

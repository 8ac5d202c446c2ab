"""PrivacyService: consent, summary, export and erasure for the calling user."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pulsesync.server.context import AppContext
from pulsesync.server.errors import Unimplemented
from pulsesync.server.identity import Identity
from pulsesync.server.rpc.base import rpc_method
from pulsesync.v1 import privacy_pb2, privacy_pb2_grpc

_NOT_YET = "privacy controls are not available in this server version yet"


class PrivacyServicer(privacy_pb2_grpc.PrivacyServiceServicer):
    def __init__(self, app: AppContext) -> None:
        self.app = app

    @rpc_method()
    async def GetConsents(
        self, request: Any, context: Any, me: Identity
    ) -> privacy_pb2.GetConsentsResponse:
        raise Unimplemented(_NOT_YET)

    @rpc_method()
    async def UpdateConsent(
        self, request: Any, context: Any, me: Identity
    ) -> privacy_pb2.UpdateConsentResponse:
        raise Unimplemented(_NOT_YET)

    @rpc_method(stream=True)
    async def WatchConsents(
        self, request: Any, context: Any, me: Identity
    ) -> AsyncIterator[privacy_pb2.WatchConsentsResponse]:
        raise Unimplemented(_NOT_YET)
        yield  # pragma: no cover

    @rpc_method()
    async def GetPrivacySummary(
        self, request: Any, context: Any, me: Identity
    ) -> privacy_pb2.GetPrivacySummaryResponse:
        raise Unimplemented(_NOT_YET)

    @rpc_method(stream=True)
    async def ExportData(
        self, request: Any, context: Any, me: Identity
    ) -> AsyncIterator[privacy_pb2.ExportDataResponse]:
        raise Unimplemented(_NOT_YET)
        yield  # pragma: no cover

    @rpc_method()
    async def EraseData(
        self, request: Any, context: Any, me: Identity
    ) -> privacy_pb2.EraseDataResponse:
        raise Unimplemented(_NOT_YET)

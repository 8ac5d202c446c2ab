"""ProfileService: encrypted, mergeable profile snapshots with a live watch."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pulsesync.server.context import AppContext
from pulsesync.server.errors import Unimplemented
from pulsesync.server.identity import Identity
from pulsesync.server.rpc.base import rpc_method
from pulsesync.v1 import profiles_pb2, profiles_pb2_grpc

_NOT_YET = "profile sync is not available in this server version yet"


class ProfileServicer(profiles_pb2_grpc.ProfileServiceServicer):
    def __init__(self, app: AppContext) -> None:
        self.app = app

    @rpc_method()
    async def GetProfile(
        self, request: Any, context: Any, me: Identity
    ) -> profiles_pb2.GetProfileResponse:
        raise Unimplemented(_NOT_YET)

    @rpc_method()
    async def UpdateProfile(
        self, request: Any, context: Any, me: Identity
    ) -> profiles_pb2.UpdateProfileResponse:
        raise Unimplemented(_NOT_YET)

    @rpc_method(stream=True)
    async def WatchProfile(
        self, request: Any, context: Any, me: Identity
    ) -> AsyncIterator[profiles_pb2.WatchProfileResponse]:
        raise Unimplemented(_NOT_YET)
        yield  # pragma: no cover

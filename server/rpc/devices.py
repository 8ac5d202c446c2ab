"""DeviceService: pairing, listing and revoking a person's devices."""

from __future__ import annotations

from typing import Any, Final

from pulsesync.server.context import RpcContext
from pulsesync.server.errors import PermissionDenied
from pulsesync.server.identity import Identity, PairingLimiter, normalize_pairing_code, peer_host
from pulsesync.server.rpc.base import Idempotent, bearer_token, rpc_method
from pulsesync.server.rpc.convert import device_message, ts
from pulsesync.server.rpc.pagination import page_size, page_tokens
from pulsesync.v1 import devices_pb2, devices_pb2_grpc

# AIP-158: a person has a handful of devices; the maximum bounds a response all the same.
DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 500


async def _paired_user(servicer: DeviceServicer, response: devices_pb2.PairDeviceResponse) -> int:
    return await servicer.rpc.identity.user_id_by_name(response.user_name)


# A lost PairDevice response must not leave a device nobody holds the token of: the retry,
# which has no token yet, is matched by its pairing code (used up by the first call).
PAIRING_RETRIES: Final = Idempotent(
    scope=lambda request: "pairing:" + normalize_pairing_code(request.pairing_code),
    owner=_paired_user,
)


class DeviceServicer(devices_pb2_grpc.DeviceServiceServicer):
    def __init__(self, rpc: RpcContext) -> None:
        self.rpc = rpc
        self.pairing_limiter = PairingLimiter(rpc.clock)

    @rpc_method(public=True, idempotent=PAIRING_RETRIES)
    async def PairDevice(
        self, request: devices_pb2.PairDeviceRequest, context: Any, _: None
    ) -> devices_pb2.PairDeviceResponse:
        peer = peer_host(str(context.peer()))
        self.pairing_limiter.check(peer)
        try:
            device, token, user_name = await self.rpc.identity.pair(
                request.pairing_code, request.device_name, request.kind
            )
        except PermissionDenied:
            self.pairing_limiter.failed(peer)
            raise
        return devices_pb2.PairDeviceResponse(
            device=device_message(device), token=token, user_name=user_name
        )

    @rpc_method()
    async def GetCurrentDevice(
        self, request: devices_pb2.GetCurrentDeviceRequest, context: Any, me: Identity
    ) -> devices_pb2.GetCurrentDeviceResponse:
        device = await self.rpc.identity.get_device(me.user_id, me.device_id)
        return devices_pb2.GetCurrentDeviceResponse(
            device=device_message(device), user_name=me.user_name
        )

    @rpc_method()
    async def ListDevices(
        self, request: devices_pb2.ListDevicesRequest, context: Any, me: Identity
    ) -> devices_pb2.ListDevicesResponse:
        size = page_size(request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        tokens = page_tokens(self.rpc.page_token_secret)
        pos = tokens.decode(request.page_token, "ListDevices", me.user_id, ())
        devices = await self.rpc.identity.list_devices(me.user_id)  # ordered by device_pk
        if pos:
            devices = [d for d in devices if d.device_pk > int(pos[0])]
        page = devices[:size]
        token = (
            tokens.encode("ListDevices", me.user_id, (), [page[-1].device_pk])
            if len(devices) > size
            else ""
        )
        return devices_pb2.ListDevicesResponse(
            devices=[device_message(d) for d in page], next_page_token=token
        )

    @rpc_method(idempotent=Idempotent())
    async def RevokeDevice(
        self, request: devices_pb2.RevokeDeviceRequest, context: Any, me: Identity
    ) -> devices_pb2.RevokeDeviceResponse:
        device = await self.rpc.identity.revoke(me.user_id, request.device_id)
        self.rpc.sessions.cut_off_device(device.device_pk)
        return devices_pb2.RevokeDeviceResponse(device=device_message(device))

    @rpc_method(idempotent=Idempotent())
    async def CreatePairingCode(
        self, request: devices_pb2.CreatePairingCodeRequest, context: Any, me: Identity
    ) -> devices_pb2.CreatePairingCodeResponse:
        code, expire_us = await self.rpc.identity.create_pairing_code(me.user_id)
        return devices_pb2.CreatePairingCodeResponse(pairing_code=code, expire_time=ts(expire_us))

    @rpc_method(idempotent=Idempotent())
    async def RotateDeviceToken(
        self, request: devices_pb2.RotateDeviceTokenRequest, context: Any, me: Identity
    ) -> devices_pb2.RotateDeviceTokenResponse:
        token, issue_us, grace_us = await self.rpc.identity.rotate_token(me, bearer_token(context))
        return devices_pb2.RotateDeviceTokenResponse(
            token=token, issue_time=ts(issue_us), previous_token_expire_time=ts(grace_us)
        )

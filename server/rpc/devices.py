"""DeviceService: pairing, listing and revoking a person's devices."""

from __future__ import annotations

from typing import Any, Final

from pulsesync.server.context import AppContext
from pulsesync.server.identity import Identity
from pulsesync.server.rpc.base import rpc_method
from pulsesync.server.rpc.convert import device_message, ts
from pulsesync.server.rpc.pagination import page_size, page_tokens
from pulsesync.v1 import devices_pb2, devices_pb2_grpc

# AIP-158: a person has a handful of devices; the maximum bounds a response all the same.
DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 500


class DeviceServicer(devices_pb2_grpc.DeviceServiceServicer):
    def __init__(self, app: AppContext) -> None:
        self.app = app

    @rpc_method(public=True)
    async def PairDevice(
        self, request: devices_pb2.PairDeviceRequest, context: Any, _: None
    ) -> devices_pb2.PairDeviceResponse:
        device, token, user_name = await self.app.identity.pair(
            request.pairing_code, request.device_name, request.kind
        )
        return devices_pb2.PairDeviceResponse(
            device=device_message(device), token=token, user_name=user_name
        )

    @rpc_method()
    async def GetCurrentDevice(
        self, request: devices_pb2.GetCurrentDeviceRequest, context: Any, me: Identity
    ) -> devices_pb2.GetCurrentDeviceResponse:
        device = await self.app.identity.get_device(me.user_id, me.device_id)
        return devices_pb2.GetCurrentDeviceResponse(
            device=device_message(device), user_name=me.user_name
        )

    @rpc_method()
    async def ListDevices(
        self, request: devices_pb2.ListDevicesRequest, context: Any, me: Identity
    ) -> devices_pb2.ListDevicesResponse:
        size = page_size(request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        tokens = page_tokens(self.app.config.data_dir)
        pos = tokens.decode(request.page_token, "ListDevices", me.user_id, ())
        devices = await self.app.identity.list_devices(me.user_id)  # ordered by device_pk
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

    @rpc_method()
    async def RevokeDevice(
        self, request: devices_pb2.RevokeDeviceRequest, context: Any, me: Identity
    ) -> devices_pb2.RevokeDeviceResponse:
        device = await self.app.identity.revoke(me.user_id, request.device_id)
        self.app.sessions.cut_off_device(device.device_pk)
        return devices_pb2.RevokeDeviceResponse(device=device_message(device))

    @rpc_method()
    async def CreatePairingCode(
        self, request: devices_pb2.CreatePairingCodeRequest, context: Any, me: Identity
    ) -> devices_pb2.CreatePairingCodeResponse:
        code, expire_us = await self.app.identity.create_pairing_code(me.user_id)
        return devices_pb2.CreatePairingCodeResponse(pairing_code=code, expire_time=ts(expire_us))

from __future__ import annotations

import grpc
import pytest

from pulsesync.server.app import RunningServer
from pulsesync.status import error_info
from pulsesync.v1 import common_pb2, devices_pb2, devices_pb2_grpc, ingest_pb2_grpc
from pulsesync.wire import STREAM_OPEN
from tests.support.server import pair_device


async def test_pair_list_and_revoke(server: RunningServer, channel: grpc.aio.Channel) -> None:
    phone = await pair_device(server, "ada", kind=common_pb2.DEVICE_KIND_PHONE)
    laptop = await pair_device(server, "ada", kind=common_pb2.DEVICE_KIND_DESKTOP)
    stub = devices_pb2_grpc.DeviceServiceStub(channel)

    me = await stub.GetCurrentDevice(
        devices_pb2.GetCurrentDeviceRequest(), metadata=phone.metadata, timeout=5
    )
    assert me.device.device_id == phone.device_id
    assert me.user_name == "ada"

    listed = await stub.ListDevices(
        devices_pb2.ListDevicesRequest(), metadata=phone.metadata, timeout=5
    )
    assert {d.device_id for d in listed.devices} == {phone.device_id, laptop.device_id}

    await stub.RevokeDevice(
        devices_pb2.RevokeDeviceRequest(device_id=laptop.device_id),
        metadata=phone.metadata,
        timeout=5,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListDevices(
            devices_pb2.ListDevicesRequest(), metadata=laptop.metadata, timeout=5
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(err.value)
    assert info is not None
    assert info.reason == "DEVICE_REVOKED"
    assert info.domain == "pulsesync.v1"


async def test_pairing_code_is_single_use(server: RunningServer, channel: grpc.aio.Channel) -> None:
    user_id = await server.app.identity.add_user("bo")
    code, _ = await server.app.identity.create_pairing_code(user_id)
    stub = devices_pb2_grpc.DeviceServiceStub(channel)
    req = devices_pb2.PairDeviceRequest(
        pairing_code=code.lower(), device_name="p", kind=common_pb2.DEVICE_KIND_PHONE
    )
    await stub.PairDevice(req, timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.PairDevice(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_missing_token_is_unauthenticated(channel: grpc.aio.Channel) -> None:
    stub = devices_pb2_grpc.DeviceServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListDevices(devices_pb2.ListDevicesRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization" in (err.value.details() or "")


async def test_bad_pairing_request_is_invalid_argument(channel: grpc.aio.Channel) -> None:
    stub = devices_pb2_grpc.DeviceServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.PairDevice(
            devices_pb2.PairDeviceRequest(
                pairing_code="x",
                device_name="p",
                kind=99,  # type: ignore[arg-type]
            ),
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_stream_is_opened_only_for_a_valid_token(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    """Streams announce acceptance in their initial metadata; a refused one ends without it,
    with the server's status (what the agent's uplink waits on before its first write)."""
    phone = await pair_device(server, "ada", kind=common_pb2.DEVICE_KIND_PHONE)
    stub = ingest_pb2_grpc.IngestServiceStub(channel)

    accepted = stub.Upload(metadata=phone.metadata, timeout=5)  # type: ignore[call-arg]
    assert STREAM_OPEN in list(await accepted.initial_metadata())
    accepted.cancel()

    bad_token = (("authorization", "Bearer not-a-token"),)
    refused = stub.Upload(metadata=bad_token, timeout=5)  # type: ignore[call-arg]
    assert STREAM_OPEN not in list(await refused.initial_metadata() or ())
    assert await refused.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "name", ["phone\x1b]0;owned\x07", "tab\there", "abc\u202egnp.exe", "line\nbreak"]
)
async def test_a_device_name_with_control_characters_is_refused_and_the_code_kept(
    server: RunningServer, channel: grpc.aio.Channel, name: str
) -> None:
    # The admin commands print device names: a terminal escape or a bidirectional override
    # there would act on the operator's terminal or disguise the name.
    user_id = await server.app.identity.add_user("cy")
    code, _ = await server.app.identity.create_pairing_code(user_id)
    stub = devices_pb2_grpc.DeviceServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.PairDevice(
            devices_pb2.PairDeviceRequest(
                pairing_code=code, device_name=name, kind=common_pb2.DEVICE_KIND_PHONE
            ),
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(err.value)
    assert info is not None
    assert info.reason == "INVALID_NAME"
    # Refused before the code was used: the person can pair with a plain name.
    await stub.PairDevice(
        devices_pb2.PairDeviceRequest(
            pairing_code=code, device_name="Zoë's phone \u200d", kind=common_pb2.DEVICE_KIND_PHONE
        ),
        timeout=5,
    )


def test_stored_names_are_printed_with_control_characters_escaped() -> None:
    from pulsesync.server.cli import _shown

    # A name stored before such names were refused never reaches the terminal as an escape.
    assert _shown("phone\x1b]0;owned\x07") == "phone\\x1b]0;owned\\x07"
    assert _shown("Zoë's phone") == "Zoë's phone"

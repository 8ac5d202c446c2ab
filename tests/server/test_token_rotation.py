"""RotateDeviceToken: a new token, the old one accepted for a grace period; maximum token age."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from pulsesync.server.app import RunningServer
from pulsesync.server.clock import FakeClock
from pulsesync.server.identity import ROTATION_GRACE_US, parse_duration_s
from pulsesync.server.rpc.base import error_info
from pulsesync.v1 import devices_pb2, devices_pb2_grpc
from tests.support.server import pair_device, start_server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fake_server(tmp_path: Path, clock: FakeClock):  # type: ignore[no-untyped-def]
    async with start_server(tmp_path, clock=clock) as running:
        yield running


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def whoami(stub: Any, token: str) -> str:
    resp = await stub.GetCurrentDevice(
        devices_pb2.GetCurrentDeviceRequest(), metadata=bearer(token), timeout=10
    )
    return str(resp.device.device_id)


async def refused(stub: Any, token: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await whoami(stub, token)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(err.value)
    assert info is not None
    return str(info.reason)


async def test_rotation_gives_a_new_token_and_the_old_one_a_grace_period(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    dev = await pair_device(fake_server, "ada")
    old = dev.metadata[0][1].removeprefix("Bearer ")
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        stub = devices_pb2_grpc.DeviceServiceStub(ch)
        resp = await stub.RotateDeviceToken(
            devices_pb2.RotateDeviceTokenRequest(), metadata=bearer(old), timeout=10
        )
        assert resp.token != old
        assert resp.issue_time.ToMicroseconds() == clock.now_us()
        assert (
            resp.previous_token_expire_time.ToMicroseconds() == clock.now_us() + ROTATION_GRACE_US
        )
        # Both work during the grace period.
        assert await whoami(stub, old) == dev.device_id
        assert await whoami(stub, resp.token) == dev.device_id
        # The response was "lost": the device retries with the token it holds and gets
        # another; the token it never received stops working, the old one keeps its grace.
        retry = await stub.RotateDeviceToken(
            devices_pb2.RotateDeviceTokenRequest(), metadata=bearer(old), timeout=10
        )
        assert retry.previous_token_expire_time == resp.previous_token_expire_time
        assert await refused(stub, resp.token) == "TOKEN_UNKNOWN"
        assert await whoami(stub, retry.token) == dev.device_id
        assert await whoami(stub, old) == dev.device_id
        # After the grace period only the new token works.
        clock.advance(ROTATION_GRACE_US / 1e6 + 1)
        assert await refused(stub, old) == "TOKEN_ROTATED"
        assert await whoami(stub, retry.token) == dev.device_id


async def test_tokens_older_than_the_maximum_age_are_refused_until_rotated(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    day = 86_400
    fake_server.app.identity.max_token_age_us = 30 * day * 1_000_000
    a = await pair_device(fake_server, "ada")
    b = await pair_device(fake_server, "ada")
    token_a = a.metadata[0][1].removeprefix("Bearer ")
    token_b = b.metadata[0][1].removeprefix("Bearer ")
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        stub = devices_pb2_grpc.DeviceServiceStub(ch)
        assert await whoami(stub, token_a) == a.device_id  # cached from here on
        clock.advance(20 * day)
        rotated = await stub.RotateDeviceToken(
            devices_pb2.RotateDeviceTokenRequest(), metadata=bearer(token_b), timeout=10
        )
        clock.advance(11 * day)
        # a never rotated: refused, even though its identity was cached.
        assert await refused(stub, token_a) == "TOKEN_EXPIRED"
        # b rotated at day 20: its new token is 11 days old.
        assert await whoami(stub, rotated.token) == b.device_id


def test_durations_parse() -> None:
    assert parse_duration_s("90d") == 90 * 86_400
    assert parse_duration_s("12h") == 12 * 3600
    assert parse_duration_s("3600") == 3600
    for bad in ("", "soon", "-1d", "0"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration_s(bad)

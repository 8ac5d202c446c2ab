"""The agent rotates its device token when it is due, against a real server."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest

from pulsesync.edge_agent.agent import Agent
from pulsesync.edge_agent.client import Credentials
from pulsesync.edge_agent.config import StatePaths
from pulsesync.edge_agent.credentials import (
    ROTATE_EVERY_S,
    rotate_if_due,
    stamp_path,
    token_issue_us,
)
from pulsesync.server.app import RunningServer
from pulsesync.v1 import common_pb2, devices_pb2, devices_pb2_grpc
from tests.support.server import pair_device


async def paired_credentials(server: RunningServer, path: Path, age_s: float) -> Credentials:
    dev = await pair_device(server, "ada")
    creds = Credentials(server.address, dev.device_id, dev.token, common_pb2.DEVICE_KIND_DESKTOP)
    creds.save(path)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return creds


async def device_of(server: RunningServer, token: str) -> str:
    async with grpc.aio.insecure_channel(server.address) as ch:
        resp = await devices_pb2_grpc.DeviceServiceStub(ch).GetCurrentDevice(
            devices_pb2.GetCurrentDeviceRequest(),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
    return str(resp.device.device_id)


async def test_a_token_due_for_rotation_is_replaced_and_saved(
    server: RunningServer, tmp_path: Path
) -> None:
    path = tmp_path / "credentials.json"
    old = await paired_credentials(server, path, age_s=ROTATE_EVERY_S + 3600)
    now_us = time.time_ns() // 1000
    new = await rotate_if_due(old, path, now_us=now_us)
    assert new.token != old.token
    assert Credentials.load(path).token == new.token
    assert abs(token_issue_us(path) - now_us) < 3600 * 1_000_000
    assert await device_of(server, new.token) == old.device_id
    # not due any more: kept as it is
    assert await rotate_if_due(new, path, now_us=now_us) is new


async def test_a_fresh_token_is_kept_and_an_unreachable_server_is_not_fatal(
    server: RunningServer, tmp_path: Path
) -> None:
    path = tmp_path / "credentials.json"
    creds = await paired_credentials(server, path, age_s=60)
    now_us = time.time_ns() // 1000
    assert await rotate_if_due(creds, path, now_us=now_us) is creds
    assert not stamp_path(path).exists()
    gone = Credentials("127.0.0.1:1", creds.device_id, creds.token, creds.kind)
    gone.save(path)
    assert await rotate_if_due(gone, path, now_us=now_us + 10 * ROTATE_EVERY_S * 10**6) is gone


@pytest.mark.parametrize("age_s", [ROTATE_EVERY_S + 60])
async def test_the_agent_rotates_at_start_from_its_state_dir(
    server: RunningServer, tmp_path: Path, age_s: float
) -> None:
    paths = StatePaths(tmp_path)
    old = await paired_credentials(server, paths.credentials, age_s=age_s)
    agent = Agent.from_state_dir(tmp_path)
    async with agent:
        assert agent.credentials is not None
        assert agent.credentials.token != old.token
    assert Credentials.load(paths.credentials).token == agent.credentials.token

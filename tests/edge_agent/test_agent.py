"""The agent against the real server over loopback gRPC."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import pytest

from pulsesync.edge_agent.agent import Agent
from pulsesync.edge_agent.client import Credentials, PairingRequired
from pulsesync.edge_agent.config import AgentSettings
from pulsesync.edge_agent.consent import StaticConsent
from pulsesync.edge_agent.outbox import read_stats
from pulsesync.server.app import RunningServer
from pulsesync.v1 import common_pb2, devices_pb2, devices_pb2_grpc, events_pb2
from tests.support.server import PairedDevice, pair_device


def _creds(server: RunningServer, device: PairedDevice) -> Credentials:
    return Credentials(server=server.address, device_id=device.device_id, token=device.token)


async def stored(server: RunningServer, device_id: str) -> list[events_pb2.Event]:
    rows = await server.app.db.reader.execute_fetchall(
        "SELECT e.body FROM events e JOIN devices d USING (device_pk)"
        " WHERE d.device_id = ? ORDER BY e.seq",
        (device_id,),
    )
    return [events_pb2.Event.FromString(body) for (body,) in rows]


async def test_tracked_events_reach_the_server_once(server: RunningServer, tmp_path: Path) -> None:
    phone = await pair_device(server, "ada")
    async with Agent(
        tmp_path / "outbox.db", _creds(server, phone), consent=StaticConsent()
    ) as agent:
        sid = agent.tracker.session_start("study")
        for i in range(300):
            agent.tracker.tap("study", "deck", f"card_{i}")
        agent.tracker.session_end("study", sid, 42.0)
        assert await agent.drain(timeout_s=10)
        last_seq = agent.outbox.last_seq
    events = await stored(server, phone.device_id)
    assert [e.seq for e in events] == list(range(1, last_seq + 1))
    assert last_seq == 302
    assert len({e.event_id for e in events}) == 302
    assert events[1].tap.target == "card_0"


async def test_collects_offline_and_sends_after_restart(
    server: RunningServer, tmp_path: Path
) -> None:
    phone = await pair_device(server, "ada")
    async with Agent(
        tmp_path / "outbox.db", consent=StaticConsent()
    ) as agent:  # no credentials: collect only
        for i in range(50):
            agent.tracker.search("study", f"query {i}", i)
    assert read_stats(tmp_path / "outbox.db").depth == 50
    async with Agent(
        tmp_path / "outbox.db", _creds(server, phone), consent=StaticConsent()
    ) as agent:
        agent.tracker.tap("study", "home", "start")
        assert await agent.drain(timeout_s=10)
    events = await stored(server, phone.device_id)
    assert [e.seq for e in events] == list(range(1, 52))


async def test_revoked_device_is_told_to_pair_again(server: RunningServer, tmp_path: Path) -> None:
    phone = await pair_device(server, "ada")
    desktop = await pair_device(server, "ada", kind=common_pb2.DEVICE_KIND_DESKTOP)
    settings = AgentSettings(backoff_base_s=0.05, backoff_cap_s=0.2)
    async with Agent(
        tmp_path / "outbox.db", _creds(server, phone), consent=StaticConsent(), settings=settings
    ) as agent:
        agent.tracker.tap("study", "home", "start")
        assert await agent.drain(timeout_s=10)
        async with grpc.aio.insecure_channel(server.address) as ch:
            await devices_pb2_grpc.DeviceServiceStub(ch).RevokeDevice(
                devices_pb2.RevokeDeviceRequest(device_id=phone.device_id),
                metadata=desktop.metadata,
                timeout=5,
            )
        agent.tracker.tap("study", "home", "again")
        with pytest.raises(PairingRequired, match="pulsesync-agent pair"):
            await agent.drain(timeout_s=10)
        assert agent.uplink_task is not None
        assert agent.uplink_task.done()


async def test_cli_pair_status_and_run(server: RunningServer, tmp_path: Path) -> None:
    user_id = await server.app.identity.add_user("grace")
    for category in (common_pb2.CONSENT_CATEGORY_BEHAVIOR,):
        await server.app.consent.set(user_id, category, True, device_id="test-setup")
    code, _ = await server.app.identity.create_pairing_code(user_id)
    state = tmp_path / "state"

    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pulsesync.edge_agent.cli", "--state-dir", str(state), *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    rc, out, err = await cli("pair", "--server", server.address, "--code", code,
                             "--kind", "phone", "--name", "grace-phone")  # fmt: skip
    assert rc == 0, err
    assert "paired as device" in out
    creds_file = state / "credentials.json"
    assert creds_file.stat().st_mode & 0o777 == 0o600
    creds = Credentials.load(creds_file)
    assert creds.token not in out + err
    assert creds.token not in repr(creds)

    rc, out, err = await cli("run", "--source", "simulated-phone", "--speed", "2000",
                             "--duration", "1.5", "--seed", "4", "--progress", "0.5")  # fmt: skip
    assert rc == 0, err
    assert "every event is acknowledged" in out
    stats = read_stats(state / "outbox.db")
    assert stats.depth == 0
    assert stats.last_seq > 20
    events = await stored(server, creds.device_id)
    assert [e.seq for e in events] == list(range(1, stats.last_seq + 1))

    rc, out, _ = await cli("status")
    assert rc == 0
    assert f"last seq:      {stats.last_seq}" in out
    assert "0 events waiting" in out

    rc, _, err = await cli("pair", "--server", server.address, "--code", code, "--kind", "phone")
    assert rc == 1, "a used code is refused"
    assert "pairing failed" in err

"""Mutating calls of the agent survive a lost answer: each carries a request_id (AIP-155) and
is retried with it, against a real server behind a proxy that cuts the connection just before
the response arrives (the server has carried the call out by then)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import grpc
import pytest

from pulsesync.edge_agent import retry
from pulsesync.edge_agent.client import AgentError, Credentials, pair
from pulsesync.edge_agent.config import AgentSettings
from pulsesync.edge_agent.consent_sync import SyncedConsent
from pulsesync.edge_agent.credentials import rotate
from pulsesync.edge_agent.profiles import ProfileSync
from pulsesync.server.app import RunningServer
from pulsesync.status import error_info
from pulsesync.v1 import (
    common_pb2,
    devices_pb2,
    devices_pb2_grpc,
    profiles_pb2_grpc,
)
from tests.edge_agent.lossy_proxy import lossy_proxy
from tests.support.server import pair_device


async def _code(server: RunningServer, user: str) -> str:
    ids = server.app.identity
    code, _ = await ids.create_pairing_code(await ids.add_user(user))
    return code


async def _kept_answers(server: RunningServer, method: str) -> int:
    """How many first answers the server keeps for retries of method: exactly one when the
    lost call and its retry shared a request_id (none without one, two with a new one)."""
    rows = await server.app.db.reader.execute_fetchall(
        "SELECT count(*) FROM idempotency_records WHERE method = ?", (method,)
    )
    return int(next(iter(rows))[0])


async def _device_of(server: RunningServer, token: str) -> str:
    async with grpc.aio.insecure_channel(server.address) as ch:
        resp = await devices_pb2_grpc.DeviceServiceStub(ch).GetCurrentDevice(
            devices_pb2.GetCurrentDeviceRequest(),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
    return str(resp.device.device_id)


async def test_a_lost_pairing_answer_is_recovered_with_the_same_device_and_token(
    server: RunningServer,
) -> None:
    code = await _code(server, "ada")
    async with lossy_proxy(server.address) as proxy:
        proxy.lose_answers(1)
        creds = await pair(proxy.address, code, common_pb2.DEVICE_KIND_PHONE, "ada's phone")
    assert proxy.lost == 1
    assert await _device_of(server, creds.token) == creds.device_id
    user_id = await server.app.identity.user_id_by_name("ada")
    # The first call paired the device; the retry got its answer instead of a second device.
    assert [d.device_id for d in await server.app.identity.list_devices(user_id)] == [
        creds.device_id
    ]
    assert await _kept_answers(server, "DeviceService.PairDevice") == 1


async def test_without_a_request_id_the_same_loss_leaves_an_unreachable_device(
    server: RunningServer,
) -> None:
    """The baseline the request_id fixes: a plain retry finds the code used up."""
    code = await _code(server, "ada")
    request = devices_pb2.PairDeviceRequest(
        pairing_code=code, device_name="p", kind=common_pb2.DEVICE_KIND_PHONE
    )
    async with lossy_proxy(server.address) as proxy:
        proxy.lose_answers(1)
        async with grpc.aio.insecure_channel(proxy.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as lost:
                await devices_pb2_grpc.DeviceServiceStub(ch).PairDevice(request, timeout=10)
            assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
        # A fresh connection, so that the retry reaches the server rather than a dying link.
        async with grpc.aio.insecure_channel(proxy.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as retried:
                await devices_pb2_grpc.DeviceServiceStub(ch).PairDevice(request, timeout=10)
    assert retried.value.code() != grpc.StatusCode.OK
    info = error_info(retried.value)
    assert info is not None, (retried.value.code(), retried.value.details())
    assert info.reason.startswith("PAIRING_CODE")
    user_id = await server.app.identity.user_id_by_name("ada")
    assert len(await server.app.identity.list_devices(user_id)) == 1


async def test_a_refused_pairing_is_not_retried(server: RunningServer) -> None:
    async with lossy_proxy(server.address) as proxy:
        with pytest.raises(AgentError, match="pairing failed"):
            await pair(proxy.address, "NOT-A-CODE", common_pb2.DEVICE_KIND_PHONE, "x")
    assert proxy.connections == 1  # INVALID_ARGUMENT/NOT_FOUND: one call, no retry


async def test_a_lost_rotation_answer_yields_the_token_the_server_issued(
    server: RunningServer, tmp_path: Path
) -> None:
    dev = await pair_device(server, "ada")
    path = tmp_path / "credentials.json"
    async with lossy_proxy(server.address) as proxy:
        old = Credentials(proxy.address, dev.device_id, dev.token, dev.kind)
        old.save(path)
        proxy.lose_answers(1)
        new = await rotate(old, path)
    assert proxy.lost == 1
    assert new.token != old.token
    assert json.loads(path.read_text())["token"] == new.token
    assert await _device_of(server, new.token) == dev.device_id
    assert await _kept_answers(server, "DeviceService.RotateDeviceToken") == 1


async def test_a_lost_consent_answer_is_retried_once_with_the_same_request(
    server: RunningServer, tmp_path: Path
) -> None:
    dev = await pair_device(server, "ada", consents=())
    async with lossy_proxy(server.address) as proxy:
        sync = SyncedConsent(
            tmp_path,
            Credentials(proxy.address, dev.device_id, dev.token, dev.kind),
            settings=AgentSettings(),
        )
        proxy.lose_answers(1)
        consent = await sync.update(common_pb2.CONSENT_CATEGORY_ACTIVITY, True, "v1")
    assert proxy.lost == 1
    assert consent.granted
    assert common_pb2.CONSENT_CATEGORY_ACTIVITY in sync.granted
    assert await _kept_answers(server, "PrivacyService.UpdateConsent") == 1


async def test_a_lost_profile_answer_is_resent_with_the_same_request_id(
    server: RunningServer, tmp_path: Path
) -> None:
    dev = await pair_device(server, "ada")
    sync = ProfileSync(tmp_path, dev.device_id)
    sync.edit(lambda p: setattr(p.goals, "daily_steps", 9000))
    sent_ids: list[str] = []
    async with (
        lossy_proxy(server.address) as proxy,
        grpc.aio.insecure_channel(proxy.address) as ch,
    ):
        stub = profiles_pb2_grpc.ProfileServiceStub(ch)
        real = stub.UpdateProfile

        async def spy(req, **kw):  # type: ignore[no-untyped-def]
            sent_ids.append(req.request_id)
            return await real(req, **kw)

        stub.UpdateProfile = spy  # type: ignore[method-assign,assignment]
        proxy.lose_answers(1)
        with pytest.raises(grpc.aio.AioRpcError):
            await sync.push(stub, dev.metadata)
        assert sync.pending_paths  # not acknowledged: still pending
        resp = None
        async for _ in retry.UNARY.attempts(max_attempts=8):  # as the sync loop reconnects
            with contextlib.suppress(grpc.aio.AioRpcError):
                resp = await sync.push(stub, dev.metadata)
                break
    assert resp is not None
    assert resp.profile.goals.daily_steps == 9000
    assert not sync.pending_paths
    # The lost send and every retry of it (one more while the channel reconnects) share it.
    assert len(sent_ids) >= 2
    assert len(set(sent_ids)) == 1
    assert sent_ids[0]
    # Applied once: one version, not two.
    assert resp.profile.version == 1
    assert await _kept_answers(server, "ProfileService.UpdateProfile") == 1

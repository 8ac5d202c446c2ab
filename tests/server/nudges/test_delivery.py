"""Nudges for apps that are not open, over real gRPC: push by webhook, pending fetch."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from pulsesync.server.app import RunningServer, running_server
from pulsesync.server.cli import build_parser, config_from
from pulsesync.server.clock import FakeClock
from pulsesync.server.config import NudgeConfig, ServerConfig, load_config
from pulsesync.server.nudges.push import ENV_SECRET, ENV_URL, WebhookPushProvider, push_provider
from pulsesync.v1 import common_pb2, nudges_pb2, nudges_pb2_grpc
from tests.server.nudges.support import (
    PushReceiver,
    push_receiver,
    register_push_target,
    steps_event,
    store,
)
from tests.support.server import PairedDevice, pair_device

MIN = 60_000_000
NOON = 1_767_268_800_000_000  # 2026-01-01T12:00Z
SECRET = "gateway-secret-0123456789"


@pytest.fixture
def receiver() -> Iterator[PushReceiver]:
    with push_receiver(fail=1) as r:
        yield r


@pytest.fixture
async def srv(
    tmp_path: Path, receiver: PushReceiver
) -> AsyncIterator[tuple[RunningServer, FakeClock]]:
    clock = FakeClock(NOON - 100 * MIN)
    nudges = NudgeConfig(scheduler="manual", seed=3, push_url=receiver.url, push_secret=SECRET)
    config = ServerConfig(port=0, data_dir=tmp_path, grace_seconds=0.5, nudges=nudges)
    async with running_server(config, clock=clock) as server:
        eng = _engine(server)
        eng.catalog = replace(
            eng.catalog, policy=replace(eng.catalog.policy, cold_start_send_probability=1.0)
        )
        if eng.push is not None:
            eng.push.backoff_s = 0.01
        yield server, clock


def _engine(server: RunningServer) -> Any:
    return server.servicers["pulsesync.v1.NudgeService"].engine  # type: ignore[attr-defined]


async def _decide(server: RunningServer, clock: FakeClock, dev: PairedDevice) -> list[Any]:
    """A long sedentary morning, then the noon decision point: the nudges made."""
    eng = _engine(server)
    start = NOON - 100 * MIN
    await store(server, dev.device_id, [steps_event(start + m * MIN, 2) for m in range(1, 95)])
    clock.set_us(start + 96 * MIN)
    await eng.tick()
    clock.set_us(NOON + 20 * MIN)
    return [d for d in await eng.tick() if d.nudge is not None]


async def _row(server: RunningServer, sql: str, *args: object) -> Any:
    async with server.app.db.reader.execute(sql, args) as cur:
        return await cur.fetchone()


async def test_a_device_without_a_stream_gets_its_nudge_by_push(
    srv: tuple[RunningServer, FakeClock], receiver: PushReceiver
) -> None:
    server, clock = srv
    phone = await pair_device(server, "ada", kind=common_pb2.DEVICE_KIND_PHONE)
    await register_push_target(server.address, phone, "fcm:abc")
    async with grpc.aio.insecure_channel(server.address) as ch:
        stub = nudges_pb2_grpc.NudgeServiceStub(ch)
        sent = await _decide(server, clock, phone)
        assert len(sent) == 1
        await _engine(server).feedback_settled()
        nudge = sent[0].nudge
        assert len(receiver.posts) == 2  # one 503, then accepted
        headers, body = receiver.posts[-1]
        stamp = headers["x-pulsesync-timestamp"]
        mac = hmac.new(SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        assert headers["x-pulsesync-signature"] == f"sha256={mac}"
        payload = json.loads(body)
        assert payload["push_token"] == "fcm:abc"
        assert payload["nudge_id"] == nudge.nudge_id
        assert payload["device_id"] == phone.device_id
        row = await _row(
            server,
            "SELECT state, channel, probability FROM nudges WHERE nudge_id = ?",
            nudge.nudge_id,
        )
        assert row[:2] == ("delivered", "push")
        # The probability logged is that of the decision that led to this delivery.
        logged = await _row(
            server,
            "SELECT probability, chosen FROM nudge_decisions WHERE nudge_id = ?",
            nudge.nudge_id,
        )
        assert logged == (row[2], nudge.nudge_type)
        assert logged[0] == pytest.approx(sent[0].probabilities[nudge.nudge_type])
        # Pushed means delivered: fetching finds nothing more.
        fetched = await stub.FetchPendingNudges(
            nudges_pb2.FetchPendingNudgesRequest(), metadata=phone.metadata, timeout=10
        )
        assert list(fetched.nudges) == []


async def test_an_app_that_fetches_when_it_wakes_gets_pending_nudges_once(
    srv: tuple[RunningServer, FakeClock], receiver: PushReceiver
) -> None:
    server, clock = srv
    phone = await pair_device(server, "bo", kind=common_pb2.DEVICE_KIND_PHONE)
    async with grpc.aio.insecure_channel(server.address) as ch:
        stub = nudges_pb2_grpc.NudgeServiceStub(ch)
        fetch = nudges_pb2.FetchPendingNudgesRequest()
        # The app wakes once: from then on it counts as reachable by fetching.
        first = await stub.FetchPendingNudges(fetch, metadata=phone.metadata, timeout=10)
        assert list(first.nudges) == []
        sent = await _decide(server, clock, phone)
        assert len(sent) == 1
        assert receiver.posts == []  # not a push target
        got = await stub.FetchPendingNudges(fetch, metadata=phone.metadata, timeout=10)
        assert [n.nudge_id for n in got.nudges] == [sent[0].nudge.nudge_id]
        assert got.nudges[0].device_id == phone.device_id
        row = await _row(
            server, "SELECT state, channel FROM nudges WHERE nudge_id = ?", sent[0].nudge.nudge_id
        )
        assert row == ("delivered", "pending")
        again = await stub.FetchPendingNudges(fetch, metadata=phone.metadata, timeout=10)
        assert list(again.nudges) == []


async def test_a_device_no_path_reaches_gets_no_nudge(
    srv: tuple[RunningServer, FakeClock],
) -> None:
    server, clock = srv
    phone = await pair_device(server, "ed", kind=common_pb2.DEVICE_KIND_PHONE)
    # No stream, no push target, never fetched: no device to reach, nothing is chosen.
    assert await _decide(server, clock, phone) == []


async def test_a_removed_push_target_is_no_way_in(
    srv: tuple[RunningServer, FakeClock], receiver: PushReceiver
) -> None:
    server, clock = srv
    phone = await pair_device(server, "fe", kind=common_pb2.DEVICE_KIND_PHONE)
    for token in ("fcm:fe", ""):  # registered, then removed (an empty token)
        await register_push_target(server.address, phone, token)
    # Removing the token is no fetch: the app never fetched, so nothing reaches it.
    assert await _decide(server, clock, phone) == []
    assert receiver.posts == []


async def test_expired_pending_nudges_are_not_fetched(srv: tuple[RunningServer, FakeClock]) -> None:
    server, clock = srv
    phone = await pair_device(server, "cy", kind=common_pb2.DEVICE_KIND_PHONE)
    async with grpc.aio.insecure_channel(server.address) as ch:
        stub = nudges_pb2_grpc.NudgeServiceStub(ch)
        fetch = nudges_pb2.FetchPendingNudgesRequest()
        await stub.FetchPendingNudges(fetch, metadata=phone.metadata, timeout=10)
        sent = await _decide(server, clock, phone)
        assert len(sent) == 1
        clock.set_us(sent[0].nudge.expire_time.ToMicroseconds())
        got = await stub.FetchPendingNudges(fetch, metadata=phone.metadata, timeout=10)
        assert list(got.nudges) == []


async def test_push_tokens_are_bounded(srv: tuple[RunningServer, FakeClock]) -> None:
    server, _ = srv
    phone = await pair_device(server, "di")
    async with grpc.aio.insecure_channel(server.address) as ch:
        stub = nudges_pb2_grpc.NudgeServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RegisterPushTarget(
                nudges_pb2.RegisterPushTargetRequest(push_token="x" * 5000), metadata=phone.metadata, timeout=10
            )  # fmt: skip
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_push_provider_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_URL, raising=False)
    monkeypatch.delenv(ENV_SECRET, raising=False)
    assert push_provider(load_config().nudges) is None
    monkeypatch.setenv(ENV_URL, "http://127.0.0.1:9/push")
    with pytest.raises(ValueError, match="secret"):
        push_provider(load_config().nudges)
    monkeypatch.setenv(ENV_SECRET, SECRET)
    provider = push_provider(load_config().nudges)
    assert isinstance(provider, WebhookPushProvider)
    assert provider.url == "http://127.0.0.1:9/push"
    assert (
        config_from(
            build_parser().parse_args(["serve", "--push-webhook-url", "http://gw/p"])
        ).nudges.push_url
        == "http://gw/p"
    )

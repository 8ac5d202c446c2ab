"""Emulated strap and footpod -> bridge -> outbox -> server -> timeline, with link drops and
a server outage: every notification delivered while connected is stored once, in order."""

from __future__ import annotations

import asyncio
import contextlib
import time
from functools import partial

import grpc
import pytest

from pulsesync.edge_agent.agent import Agent
from pulsesync.edge_agent.ble.bridge import Bridge, BridgeConfig, ErrorClass, SensorLink
from pulsesync.edge_agent.client import Credentials
from pulsesync.edge_agent.config import AgentSettings
from pulsesync.edge_agent.consent import StaticConsent
from pulsesync.v1 import common_pb2, events_pb2, timeline_pb2, timeline_pb2_grpc
from tests.edge_agent.ble.test_bridge import (
    FAST,
    RECONNECT_SLACK_S,
    hr_from_payload,
    hr_tuple,
    rsc_from_payload,
    rsc_tuple,
)
from tests.support.bumble_backend import emulated_world, wait_until
from tests.support.server import pair_device, start_server
from tests.support.tcp_proxy import tcp_proxy

pytestmark = pytest.mark.slow


def _has_sessions(link: SensorLink, n: int) -> bool:
    return link.stats.sessions == n


async def _timeline(address: str, metadata, kinds: list[int]) -> list[events_pb2.TimelineEvent]:
    now = time.time()
    out: list[events_pb2.TimelineEvent] = []
    token = ""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = timeline_pb2_grpc.TimelineServiceStub(channel)
        for _ in range(100):
            req = timeline_pb2.ListEventsRequest(page_size=1000, page_token=token, kinds=kinds)  # type: ignore[arg-type]
            req.start_time.FromSeconds(int(now - 3600))
            req.end_time.FromSeconds(int(now + 3600))
            resp = await stub.ListEvents(req, metadata=metadata, timeout=10)
            out.extend(resp.events)
            token = resp.next_page_token
            if not token:
                return out
    raise AssertionError("timeline paging did not end")


async def test_strap_and_footpod_reach_the_timeline_through_drops_and_an_outage(tmp_path):
    async with start_server(tmp_path / "server") as server:
        device = await pair_device(
            server, "ada", kind=common_pb2.DEVICE_KIND_WEARABLE_BRIDGE, name="bridge"
        )
        async with tcp_proxy(server.address) as proxy, emulated_world(seed=11) as w:
            creds = Credentials(
                server=proxy.address,
                device_id=device.device_id,
                token=device.token,
                kind=common_pb2.DEVICE_KIND_WEARABLE_BRIDGE,
            )
            settings = AgentSettings(backoff_base_s=0.05, backoff_cap_s=0.3)
            async with Agent(
                tmp_path / "outbox.db", creds, consent=StaticConsent(), settings=settings
            ) as agent:
                bridge = Bridge(
                    agent.tracker,
                    [w.strap.address, w.pod.address],
                    config=BridgeConfig(scan_timeout_s=1.0, backoff=FAST, seed=5),
                    backends=w.backends,
                )
                task = asyncio.create_task(bridge.run())
                try:
                    async with asyncio.timeout(10):
                        await bridge.wait_connected()
                    for round_ in range(5):
                        if round_ == 1:
                            proxy.block()  # the server is unreachable for rounds 1-2
                        if round_ == 3:
                            proxy.unblock()
                        for _ in range(12):
                            await w.strap.tick()
                            await w.pod.tick()
                            await asyncio.sleep(0.005)
                        await wait_until(
                            lambda: (
                                agent.tracker.stats().recorded
                                >= len(w.strap.delivered) + len(w.pod.delivered)
                            )
                        )
                        for sensor, link in ((w.strap, bridge.links[0]), (w.pod, bridge.links[1])):
                            sessions = link.stats.sessions
                            await sensor.drop_link()
                            assert await sensor.tick() is None  # produced while down
                            await wait_until(partial(_has_sessions, link, sessions + 1))
                    for _ in range(5):
                        await w.strap.tick()
                        await w.pod.tick()
                    await wait_until(
                        lambda: (
                            agent.tracker.stats().recorded
                            >= len(w.strap.delivered) + len(w.pod.delivered)
                        )
                    )
                    assert await agent.drain(30), "the outbox did not empty after the outage"
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                uplink_reconnects = agent.uplink.stats().reconnects if agent.uplink else 0

        stored = await _timeline(
            server.address,
            device.metadata,
            [events_pb2.EVENT_KIND_HEART_RATE, events_pb2.EVENT_KIND_CADENCE],
        )
    assert uplink_reconnects >= 1  # the outage really cut the uplink
    seqs = [t.event.seq for t in stored]
    assert len(seqs) == len(set(seqs)), "an event was stored twice"
    by_seq = sorted(stored, key=lambda t: t.event.seq)
    assert [t.event.seq for t in stored] == [t.event.seq for t in by_seq], (
        "timeline order != notification order"
    )
    hr = [t.event.heart_rate for t in by_seq if t.event.HasField("heart_rate")]
    cadence = [t.event.cadence for t in by_seq if t.event.HasField("cadence")]
    assert w.strap.produced > len(w.strap.delivered)
    assert [hr_tuple(h) for h in hr] == [hr_from_payload(p) for p in w.strap.delivered]
    assert [rsc_tuple(c) for c in cadence] == [rsc_from_payload(p) for p in w.pod.delivered]
    assert all(t.device_id == device.device_id for t in stored)
    assert {t.device_kind for t in stored} == {common_pb2.DEVICE_KIND_WEARABLE_BRIDGE}
    reconnects = [r for s in bridge.stats for r in s.reconnects]
    assert len(reconnects) == 10
    for r in reconnects:
        assert r.error is ErrorClass.LINK_LOST
        assert 0.0 <= r.delay_s <= FAST[ErrorClass.LINK_LOST].ceiling(r.attempt)
        assert r.up_at is not None
        assert r.delay_s <= r.up_at - r.down_at <= r.delay_s + RECONNECT_SLACK_S

"""A resume_item nudge over real gRPC names the continuity item to open and why."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from pulsesync.hlc import Stamp
from pulsesync.server.app import RunningServer
from pulsesync.server.clock import FakeClock
from pulsesync.v1 import common_pb2, nudges_pb2, nudges_pb2_grpc, profiles_pb2, profiles_pb2_grpc
from tests.server.nudges.support import manual_nudge_server, steps_event, store
from tests.support.server import pair_device

MIN = 60_000_000
NOON = 1_767_268_800_000_000  # 2026-01-01T12:00Z


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, FakeClock]]:
    async with manual_nudge_server(tmp_path, NOON - 100 * MIN, seed=3) as (server, clock):
        yield server, clock


async def test_resume_nudge_carries_the_item_and_its_own_reasons(
    srv: tuple[RunningServer, FakeClock],
) -> None:
    server, clock = srv
    phone = await pair_device(server, "ada", kind=common_pb2.DEVICE_KIND_PHONE)
    eng: Any = server.servicers["pulsesync.v1.NudgeService"].engine  # type: ignore[attr-defined]
    eng.catalog = replace(
        eng.catalog, policy=replace(eng.catalog.policy, cold_start_send_probability=1.0)
    )
    others = [t.name for t in eng.catalog.types if t.name != "resume_item"]
    async with grpc.aio.insecure_channel(server.address) as ch:
        wall = clock.now_us() // 1000
        req = profiles_pb2.UpdateProfileRequest(base_version=0)
        req.profile.continuity_items.add(
            app="reader", item_id="book/1", title="Book", position="page=42", progress=0.25,
            device_id=phone.device_id,
        )  # fmt: skip
        req.profile.muted_nudge_types.extend(others)
        paths = ["continuity_items/reader/book%2F1"] + [f"muted_nudge_types/{t}" for t in others]
        for i, path in enumerate(paths):
            req.edits.add(field_path=path, stamp=Stamp(wall, i, phone.device_id).to_proto())
        profiles = profiles_pb2_grpc.ProfileServiceStub(ch)
        assert (await profiles.UpdateProfile(req, metadata=phone.metadata, timeout=10)).committed
        stub = nudges_pb2_grpc.NudgeServiceStub(ch)
        call = stub.SubscribeNudges(nudges_pb2.SubscribeNudgesRequest(), metadata=phone.metadata)
        for _ in range(500):
            if server.app.sessions.connected_device_count() == 1:
                break
            await asyncio.sleep(0.01)
        start = clock.now_us()
        await store(
            server, phone.device_id, [steps_event(start + m * MIN, 2) for m in range(1, 95)]
        )
        clock.set_us(start + 96 * MIN)
        await eng.tick()
        clock.set_us(NOON + 20 * MIN)
        made = await eng.tick()
        assert [d.chosen for d in made if d.nudge is not None] == ["resume_item"], [
            d.eligibility for d in made
        ]
        resp: Any = await asyncio.wait_for(call.read(), 10)
        nudge = resp.nudge
        assert nudge.nudge_type == "resume_item"
        assert dict(nudge.data) == {
            "app": "reader", "item_id": "book/1", "title": "Book", "position": "page=42",
            "progress": "0.25", "device_id": phone.device_id,
        }  # fmt: skip
        assert "Book" in nudge.message
        assert any("Book" in r and "reader" in r for r in nudge.reasons), nudge.reasons
        assert not any("sedentary" in r for r in nudge.reasons), nudge.reasons
        listed = await stub.ListNudges(
            nudges_pb2.ListNudgesRequest(), metadata=phone.metadata, timeout=10
        )
        assert dict(listed.nudges[0].nudge.data) == dict(nudge.data)
        call.cancel()

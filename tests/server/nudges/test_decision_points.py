"""Decision points: scheduled times and one sedentary trigger per sedentary stretch."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pulsesync.server.app import RunningServer
from pulsesync.server.clock import FakeClock
from pulsesync.v1 import common_pb2
from tests.server.nudges.support import manual_nudge_server, steps_event, store
from tests.support.server import pair_device

MIN = 60_000_000
MIDNIGHT = 1_767_225_600_000_000  # 2026-01-01T00:00Z; the default time zone is UTC


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, FakeClock]]:
    async with manual_nudge_server(tmp_path, MIDNIGHT + 60 * MIN) as (server, clock):
        yield server, clock


async def test_one_sedentary_trigger_per_stretch_even_past_the_length_cap(srv) -> None:
    server, clock = srv
    eng = server.servicers["pulsesync.v1.NudgeService"].engine
    phone = await pair_device(server, "ada", kind=common_pb2.DEVICE_KIND_PHONE)
    # Moving 01:00-01:05, then sitting: the stretch reaches 90 min at ~02:35 and the 240-min
    # cap at ~05:05, and lasts until 06:45 (a tick every 15 minutes throughout).
    await store(server, phone.device_id, [steps_event(MIDNIGHT + (60 + m) * MIN, 100) for m in range(1, 6)])  # fmt: skip
    triggers: list[tuple[int, str]] = []

    async def run_until(minute: int) -> None:
        while clock.now_us() < MIDNIGHT + minute * MIN:
            clock.advance(15 * 60)
            await eng.tick()

    await run_until(6 * 60 + 45)
    # A short walk starts a new stretch at 06:50; it is 99 min long at the 08:30 scheduled
    # decision point, which serves it: no trigger for it afterwards.
    await store(server, phone.device_id, [steps_event(MIDNIGHT + (405 + m) * MIN, 100) for m in range(1, 6)])  # fmt: skip
    await run_until(11 * 60)
    async with server.app.db.reader.execute(
        "SELECT decision_us, trigger FROM nudge_decisions ORDER BY decision_us"
    ) as cur:
        triggers = [((int(t) - MIDNIGHT) // MIN, str(k)) for t, k in await cur.fetchall()]
    assert triggers == [(2 * 60 + 45, "sedentary"), (8 * 60 + 30, "schedule")], triggers

"""The device's nudge receiver against a real server: shows nudges, reports feedback."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from pulsesync.edge_agent.client import Credentials
from pulsesync.edge_agent.nudges import NudgeReceiver
from pulsesync.server.app import running_server
from pulsesync.server.clock import FakeClock
from pulsesync.server.config import NudgeConfig, ServerConfig
from pulsesync.v1 import common_pb2, events_pb2, nudges_pb2
from tests.server.nudges.support import steps_event, store
from tests.support.server import pair_device

MIN = 60_000_000


class Recorder:
    def __init__(self) -> None:
        self.shown: list[nudges_pb2.Nudge] = []

    async def show(self, nudge: nudges_pb2.Nudge) -> Sequence[int]:
        self.shown.append(nudge)
        return [events_pb2.NUDGE_ACTION_OPENED, events_pb2.NUDGE_ACTION_ACTED]


async def test_receiver_shows_nudges_and_reports_feedback(tmp_path: Path) -> None:
    clock = FakeClock(1_767_268_800_000_000 - 100 * MIN)
    config = ServerConfig(port=0, data_dir=tmp_path, grace_seconds=0.5,
                          nudges=NudgeConfig(scheduler="manual", seed=5))  # fmt: skip
    async with running_server(config, clock=clock) as srv:
        phone = await pair_device(srv, "ada", kind=common_pb2.DEVICE_KIND_PHONE)
        presenter = Recorder()
        receiver = NudgeReceiver(
            Credentials(srv.address, phone.device_id, phone.token, phone.kind), presenter
        )
        task = asyncio.create_task(receiver.run())
        try:
            for _ in range(300):
                if srv.app.sessions.connected_device_count():
                    break
                await asyncio.sleep(0.01)
            eng = srv.servicers["pulsesync.v1.NudgeService"].engine
            start = clock.now_us()
            await store(
                srv, phone.device_id, [steps_event(start + m * MIN, 1) for m in range(1, 99)]
            )
            sent = 0
            for k in range(1, 60):
                clock.set_us(start + 99 * MIN + k * 20 * MIN)
                sent += sum(1 for d in await eng.tick() if d.nudge is not None)
                if sent:
                    break
            assert sent
            for _ in range(500):
                if presenter.shown:
                    break
                await asyncio.sleep(0.01)
            nudge_id = presenter.shown[0].nudge_id
            actions: list[int] = []
            for _ in range(500):
                async with srv.app.db.reader.execute(
                    "SELECT action FROM nudge_feedback WHERE nudge_id = ? ORDER BY feedback_id",
                    (nudge_id,),
                ) as cur:
                    actions = [a for (a,) in await cur.fetchall()]
                if len(actions) == 3:
                    break
                await asyncio.sleep(0.01)
            assert actions == [
                events_pb2.NUDGE_ACTION_DELIVERED,
                events_pb2.NUDGE_ACTION_OPENED,
                events_pb2.NUDGE_ACTION_ACTED,
            ]
            # Each report carried its own request_id (kept by the server for retries of it).
            kept = await srv.app.db.reader.execute_fetchall(
                "SELECT count(*) FROM idempotency_records WHERE method = ?",
                ("NudgeService.RecordNudgeFeedback",),
            )
            assert next(iter(kept))[0] == 3
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

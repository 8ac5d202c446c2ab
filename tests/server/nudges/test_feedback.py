"""Nudge feedback over real gRPC: by RPC and as ingested events, each recorded once."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pulsesync.server.app import RunningServer, running_server
from pulsesync.server.clock import FakeClock
from pulsesync.server.config import NudgeConfig, ServerConfig
from pulsesync.v1 import events_pb2, nudges_pb2, nudges_pb2_grpc
from tests.server.nudges.support import device_pk_of
from tests.server.timeline.events import batch, ts, upload
from tests.support.server import PairedDevice, pair_device

MIN = 60_000_000
NOON = 1_767_268_800_000_000  # 2026-01-01T12:00Z
ACTED = events_pb2.NUDGE_ACTION_ACTED
OPENED = events_pb2.NUDGE_ACTION_OPENED
DISMISSED = events_pb2.NUDGE_ACTION_DISMISSED


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[RunningServer]:
    config = ServerConfig(port=0, data_dir=tmp_path, grace_seconds=0.5,
                          nudges=NudgeConfig(scheduler="manual", seed=3))  # fmt: skip
    async with running_server(config, clock=FakeClock(NOON)) as server:
        yield server


async def _nudge(srv: RunningServer, dev: PairedDevice, nudge_id: str) -> None:
    pk, uid = await device_pk_of(srv, dev.device_id)
    async with srv.app.db.transaction() as tx:
        await tx.execute(
            "INSERT INTO nudges (nudge_id, user_id, decision_id, nudge_type, device_pk, title, message, data,"
            " probability, reasons, create_us, expire_us, state, outcome_metric)"
            " VALUES (?, ?, 0, 'walking_suggestion', ?, 't', 'm', '{}', 0.5, '[]', ?, ?, 'delivered', 'steps_30m')",
            (nudge_id, uid, pk, NOON - MIN, NOON + 20 * MIN),
        )


def _interaction(seq: int, nudge_id: str, action: int) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=str(uuid.uuid4()), seq=seq, device_time=ts(NOON),
        nudge_interaction=events_pb2.NudgeInteraction(nudge_id=nudge_id, action=action),  # type: ignore[arg-type]
    )  # fmt: skip


async def _feedback(stub: Any, dev: PairedDevice) -> dict[str, list[int]]:
    listed = await stub.ListNudges(
        nudges_pb2.ListNudgesRequest(), metadata=dev.metadata, timeout=10
    )
    return {r.nudge.nudge_id: list(r.feedback) for r in listed.nudges}


def _engine(srv: RunningServer):  # type: ignore[no-untyped-def]
    return srv.servicers["pulsesync.v1.NudgeService"].engine


async def test_retried_feedback_is_recorded_once(srv: RunningServer) -> None:
    dev = await pair_device(srv, "ada")
    await _nudge(srv, dev, "ndg_a")
    async with grpc.aio.insecure_channel(srv.address) as ch:
        stub = nudges_pb2_grpc.NudgeServiceStub(ch)
        for action in (OPENED, ACTED, ACTED):  # the second ACTED is a retry
            await stub.RecordNudgeFeedback(
                nudges_pb2.RecordNudgeFeedbackRequest(nudge_id="ndg_a", action=action),  # type: ignore[arg-type]
                metadata=dev.metadata, timeout=10,
            )  # fmt: skip
        assert await _feedback(stub, dev) == {"ndg_a": [OPENED, ACTED]}


async def test_feedback_uploaded_as_events_is_recorded(srv: RunningServer) -> None:
    dev = await pair_device(srv, "bo")
    await _nudge(srv, dev, "ndg_b")
    async with grpc.aio.insecure_channel(srv.address) as ch:
        acks = await upload(
            ch, dev.metadata, [batch(1, NOON, [_interaction(1, "ndg_b", DISMISSED)])]
        )
        assert acks[-1].acked_through_seq == 1
        await _engine(srv).feedback_settled()
        stub = nudges_pb2_grpc.NudgeServiceStub(ch)
        assert await _feedback(stub, dev) == {"ndg_b": [DISMISSED]}


async def test_the_same_feedback_by_event_and_by_rpc_is_one_record(srv: RunningServer) -> None:
    dev = await pair_device(srv, "cy")
    other = await pair_device(srv, "di")
    await _nudge(srv, dev, "ndg_c")
    await _nudge(srv, other, "ndg_d")
    async with grpc.aio.insecure_channel(srv.address) as ch:
        stub = nudges_pb2_grpc.NudgeServiceStub(ch)
        await stub.RecordNudgeFeedback(
            nudges_pb2.RecordNudgeFeedbackRequest(nudge_id="ndg_c", action=ACTED),
            metadata=dev.metadata, timeout=10,
        )  # fmt: skip
        # The outbox resends the same feedback (and a replay of the batch), and one for a
        # nudge of another person, which records nothing.
        events = [_interaction(1, "ndg_c", ACTED), _interaction(2, "ndg_c", OPENED),
                  _interaction(3, "ndg_d", ACTED)]  # fmt: skip
        await upload(ch, dev.metadata, [batch(1, NOON, events), batch(2, NOON, events)])
        await _engine(srv).feedback_settled()
        assert await _feedback(stub, dev) == {"ndg_c": [ACTED, OPENED]}
        assert await _feedback(stub, other) == {"ndg_d": []}
    async with srv.app.db.reader.execute("SELECT count(*) FROM nudge_feedback") as cur:
        assert await cur.fetchone() == (2,)

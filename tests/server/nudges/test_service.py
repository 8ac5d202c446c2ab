"""NudgeService over real gRPC: delivery to the device in use, consent, feedback, listing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from pulsesync.server.app import RunningServer
from pulsesync.server.clock import FakeClock
from pulsesync.server.nudges import feed as feed_module
from pulsesync.server.nudges.training import logged_decisions
from pulsesync.status import error_info
from pulsesync.v1 import common_pb2, events_pb2, nudges_pb2, nudges_pb2_grpc
from tests.server.nudges.support import (
    app_event,
    device_pk_of,
    manual_nudge_server,
    steps_event,
    store,
)
from tests.support.server import pair_device

MIN = 60_000_000
NOON = 1_767_268_800_000_000  # 2026-01-01T12:00Z


@pytest.fixture
async def nudge_server(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, FakeClock]]:
    async with manual_nudge_server(tmp_path, NOON - 100 * MIN, seed=3) as (srv, clock):
        yield srv, clock


def engine(srv: RunningServer):
    return srv.servicers["pulsesync.v1.NudgeService"].engine


async def test_nudge_goes_to_the_device_in_use_and_feedback_is_recorded(nudge_server) -> None:
    srv, clock = nudge_server
    phone = await pair_device(srv, "ada", kind=common_pb2.DEVICE_KIND_PHONE)
    laptop = await pair_device(srv, "ada", kind=common_pb2.DEVICE_KIND_DESKTOP)
    eng = engine(srv)
    eng.catalog = replace(
        eng.catalog, policy=replace(eng.catalog.policy, cold_start_send_probability=1.0)
    )
    async with grpc.aio.insecure_channel(srv.address) as ch:
        stub = nudges_pb2_grpc.NudgeServiceStub(ch)
        calls = {
            d.device_id: stub.SubscribeNudges(
                nudges_pb2.SubscribeNudgesRequest(), metadata=d.metadata
            )
            for d in (phone, laptop)
        }
        for _ in range(200):
            if srv.app.sessions.connected_device_count() == 2:
                break
            await asyncio.sleep(0.01)
        start = clock.now_us()
        await store(srv, phone.device_id, [steps_event(start + m * MIN, 2) for m in range(1, 95)])
        await store(
            srv, laptop.device_id, [app_event(start + 95 * MIN, "editor")]
        )  # the laptop is in use now
        clock.set_us(start + 96 * MIN)
        await eng.tick()
        clock.set_us(NOON + 20 * MIN)
        made = await eng.tick()
        sent = [d for d in made if d.nudge is not None]
        assert sent, [d.eligibility for d in made]
        laptop_pk, _ = await device_pk_of(srv, laptop.device_id)
        assert all(d.eligibility.device_for[d.chosen] == laptop_pk for d in sent)
        resp = await asyncio.wait_for(calls[laptop.device_id].read(), 5)
        assert isinstance(resp, nudges_pb2.SubscribeNudgesResponse)
        assert resp.nudge.device_id == laptop.device_id
        await stub.RecordNudgeFeedback(
            nudges_pb2.RecordNudgeFeedbackRequest(nudge_id=resp.nudge.nudge_id, action=events_pb2.NUDGE_ACTION_ACTED),
            metadata=laptop.metadata, timeout=5,
        )  # fmt: skip
        listed = await stub.ListNudges(
            nudges_pb2.ListNudgesRequest(), metadata=phone.metadata, timeout=5
        )
        assert [r.nudge.nudge_id for r in listed.nudges] == [resp.nudge.nudge_id]
        assert list(listed.nudges[0].feedback) == [events_pb2.NUDGE_ACTION_ACTED]
        assert listed.nudges[0].deliver_time.ToMicroseconds() > 0
        # Outcome computed by the server once the window and grace have passed.
        await store(srv, phone.device_id, [steps_event(NOON + 25 * MIN, 700)])
        clock.set_us(NOON + 20 * MIN + 61 * MIN)
        await eng.complete_outcomes(clock.now_us())
        listed = await stub.ListNudges(
            nudges_pb2.ListNudgesRequest(), metadata=phone.metadata, timeout=5
        )
        assert listed.nudges[0].outcome.complete
        assert listed.nudges[0].outcome.value == 700 + 2 * 0
        # The ACTED feedback feeds the person's past response and the training log.
        kind = resp.nudge.nudge_type
        uid = sent[0].user_id
        assert eng.features.user(uid).past_response(kind) == pytest.approx(1 / (1 + 5))
        logged = {d.chosen: d for d in await logged_decisions(srv.app.storage.nudges)}
        assert logged[kind].acted
        assert not any(d.acted for d in logged.values() if d.chosen == "none")
        for c in calls.values():
            c.cancel()


async def test_users_without_personalization_consent_are_never_nudged(nudge_server) -> None:
    srv, clock = nudge_server
    cats = (common_pb2.CONSENT_CATEGORY_BEHAVIOR, common_pb2.CONSENT_CATEGORY_ACTIVITY)
    phone = await pair_device(srv, "bo", kind=common_pb2.DEVICE_KIND_PHONE, consents=cats)
    eng = engine(srv)
    await store(
        srv, phone.device_id, [steps_event(clock.now_us() + m * MIN, 1) for m in range(1, 100)]
    )
    for k in range(1, 40):
        clock.set_us(NOON - 100 * MIN + k * 15 * MIN)
        made = await eng.tick()
        assert all(d.nudge is None for d in made)
    _, uid = await device_pk_of(srv, phone.device_id)
    assert uid not in eng.features.known_users()  # their events never reached the features


async def test_feedback_errors(nudge_server) -> None:
    srv, _ = nudge_server
    a = await pair_device(srv, "cy")
    async with grpc.aio.insecure_channel(srv.address) as ch:
        stub = nudges_pb2_grpc.NudgeServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RecordNudgeFeedback(
                nudges_pb2.RecordNudgeFeedbackRequest(
                    nudge_id="ndg_x", action=events_pb2.NUDGE_ACTION_DELIVERED
                ),
                metadata=a.metadata,
                timeout=5,
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RecordNudgeFeedback(
                nudges_pb2.RecordNudgeFeedbackRequest(nudge_id="ndg_x"),
                metadata=a.metadata,
                timeout=5,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info(err.value)
        assert info is not None
        assert info.reason == "INVALID_NUDGE_ACTION"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListNudges(
                nudges_pb2.ListNudgesRequest(page_token="zz"), metadata=a.metadata, timeout=5
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The server still answers.
        ok = await stub.ListNudges(nudges_pb2.ListNudgesRequest(), metadata=a.metadata, timeout=5)
        assert len(ok.nudges) == 0


async def _add_nudge(srv: RunningServer, user_id: int, nudge_id: str, create_us: int) -> None:
    async with srv.app.db.transaction() as tx:
        await tx.execute(
            "INSERT INTO nudges (nudge_id, user_id, decision_id, nudge_type, device_pk, title, message, data,"
            " probability, reasons, create_us, expire_us, state, outcome_metric)"
            " VALUES (?, ?, 0, 'walking_suggestion', NULL, 't', 'm', '{}', 0.5, '[]', ?, ?, 'pending', 'steps_30m')",
            (nudge_id, user_id, create_us, create_us + 20 * MIN),
        )


async def test_list_pages_are_keyset_and_carry_their_feedback(nudge_server) -> None:
    srv, _ = nudge_server
    a = await pair_device(srv, "di")
    _, uid = await device_pk_of(srv, a.device_id)
    times = [NOON - k // 2 * MIN for k in range(7)]  # pairs share a creation time
    ids = [f"ndg_{k:02d}" for k in range(7)]
    for nid, t in zip(ids, times, strict=True):
        await _add_nudge(srv, uid, nid, t)
    async with grpc.aio.insecure_channel(srv.address) as ch:
        stub = nudges_pb2_grpc.NudgeServiceStub(ch)
        for nid in ids[:3]:
            await stub.RecordNudgeFeedback(
                nudges_pb2.RecordNudgeFeedbackRequest(nudge_id=nid, action=events_pb2.NUDGE_ACTION_OPENED),
                metadata=a.metadata, timeout=5,
            )  # fmt: skip
        seen: list[str] = []
        token = ""
        for page in range(10):  # bounded
            resp = await stub.ListNudges(
                nudges_pb2.ListNudgesRequest(page_size=3, page_token=token),
                metadata=a.metadata,
                timeout=5,
            )
            seen += [r.nudge.nudge_id for r in resp.nudges]
            for r in resp.nudges:
                opened = [events_pb2.NUDGE_ACTION_OPENED] if r.nudge.nudge_id in ids[:3] else []
                assert list(r.feedback) == opened
            if page == 0:
                await _add_nudge(srv, uid, "ndg_new", NOON + 5 * MIN)  # newer: must not shift pages
            token = resp.next_page_token
            if not token:
                break
        assert seen == ids  # newest first, ties by id; nothing skipped or repeated


async def test_a_backlog_of_committed_events_is_folded_without_waiting_for_the_tick(
    nudge_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, clock = nudge_server
    monkeypatch.setattr(feed_module, "FOLD_BACKLOG_EVENTS", 100)
    phone = await pair_device(srv, "cy", kind=common_pb2.DEVICE_KIND_PHONE)
    eng = engine(srv)
    start = clock.now_us()

    def batch(b: int) -> list[events_pb2.Event]:
        return [steps_event(start + (b * 60 + m) * MIN, 5) for m in range(1, 61)]

    await store(srv, phone.device_id, batch(0))
    await asyncio.sleep(0.05)
    assert eng.pending_events() == 60  # below the mark: waits for the tick (none runs here)
    await store(srv, phone.device_id, batch(1))  # crosses the mark: a fold starts
    for _ in range(200):  # bounded: the fold yields between batches
        if eng.pending_events() == 0:
            break
        await asyncio.sleep(0.005)
    assert eng.pending_events() == 0
    _, uid = await device_pk_of(srv, phone.device_id)
    assert eng.features.user(uid).steps_since(start + 120 * MIN, 120) == 120 * 5

"""The cold start's send probability by local time of day (policy.cold_start_by_local_time)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from pulsesync.server.app import RunningServer
from pulsesync.server.clock import FakeClock
from pulsesync.server.nudges.catalog import load_catalog
from pulsesync.server.nudges.model import LoggedDecision
from pulsesync.server.nudges.ope import policy_matrix
from pulsesync.server.nudges.policy import choose
from pulsesync.v1 import common_pb2, nudges_pb2, nudges_pb2_grpc
from tests.server.nudges.support import manual_nudge_server, steps_event, store
from tests.support.server import pair_device

MIN = 60_000_000
MIDNIGHT = 1_767_225_600_000_000  # 2026-01-01T00:00Z; the default time zone is UTC
WALK = "walking_suggestion"
BANDS = {"policy": {"cold_start_by_local_time": {"14:30": 0.9, "11:00": 0.5, "17:00": 0.1}}}


def test_each_band_runs_from_its_time_to_the_next_and_the_default_before_the_first() -> None:
    policy = load_catalog(overrides=BANDS).policy
    assert policy.cold_start_bands == ((660, 0.5), (870, 0.9), (1020, 0.1))
    expected = {0: 0.6, 659: 0.6, 660: 0.5, 869: 0.5, 870: 0.9, 1019: 0.9, 1020: 0.1, 1439: 0.1}
    for minute, p in expected.items():
        assert policy.cold_start_probability(minute) == p, minute
    # Unknown time of day (an imported row without local_minute): the catalog's default.
    assert policy.cold_start_probability(None) == 0.6
    # Without bands, the one probability everywhere.
    assert load_catalog().policy.cold_start_probability(900) == 0.6


@pytest.mark.parametrize(
    ("bands", "message"),
    [
        ({"25:00": 0.5}, "outside 00:00..23:59"),
        ({"noon": 0.5}, "is not HH:MM"),
        ({"12:00": 1.5}, r"cold_start_by_local_time\['12:00'\] must be in \[0, 1\]"),
        ([0.5], "must be a table"),
    ],
)
def test_a_bad_band_is_refused_naming_it(bands: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_catalog(overrides={"policy": {"cold_start_by_local_time": bands}})


def test_the_policy_and_the_estimators_read_the_same_band() -> None:
    policy = load_catalog(overrides=BANDS).policy
    options = ["none", WALK]
    rng = random.Random(1)
    for minute, p in ((600, 0.6), (700, 0.5), (900, 0.9), (1100, 0.1)):
        choice = choose(options, None, policy, rng, local_minute=minute)
        assert choice.probabilities == pytest.approx({"none": 1 - p, WALK: p})
        logged = LoggedDecision(
            user_id=1, decision_us=0, features={"local_minute": float(minute)}, past_gain={},
            options={"none": 1 - p, WALK: p}, chosen="none", probability=1 - p, outcome=0.0,
        )  # fmt: skip
        # The cold start as a target policy in off-policy evaluation: the same probabilities.
        pi = policy_matrix([logged], ["none", WALK], policy, None)
        assert pi[0].tolist() == pytest.approx([1 - p, p])


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, FakeClock]]:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(
        '[policy]\nschedule = ["08:30", "15:30"]\nsedentary_trigger_min = 100000\n'
        "cold_start_send_probability = 0.6\n"
        '[policy.cold_start_by_local_time]\n"06:00" = 0.0\n"15:00" = 1.0\n"16:00" = 0.6\n'
    )
    start = MIDNIGHT + 7 * 60 * MIN
    async with manual_nudge_server(tmp_path / "data", start, catalog=catalog) as (server, clock):
        yield server, clock


async def test_the_server_logs_the_band_of_each_decision_points_local_time(srv) -> None:
    server, clock = srv
    eng = server.servicers["pulsesync.v1.NudgeService"].engine
    phone = await pair_device(server, "ada", kind=common_pb2.DEVICE_KIND_PHONE)
    made = []
    async with grpc.aio.insecure_channel(server.address) as ch:
        stream = nudges_pb2_grpc.NudgeServiceStub(ch).SubscribeNudges(
            nudges_pb2.SubscribeNudgesRequest(), metadata=phone.metadata
        )
        for _ in range(3000):  # the phone is reachable once its stream is open
            if server.app.sessions.connected_device_count() == 1:
                break
            await asyncio.sleep(0.01)
        await eng.tick()
        for day in range(3):
            base = MIDNIGHT + day * 1440 * MIN
            for at in (8 * 60 + 30, 15 * 60 + 30):
                # The phone is in use and the person is not walking: a nudge is eligible
                # at every decision point.
                await store(server, phone.device_id, [steps_event(base + (at - 5) * MIN, 2)])
                clock.set_us(base + at * MIN)
                made += await eng.tick()
        stream.cancel()
    assert len(made) == 6, [(d.decision_us, d.eligibility.ineligible) for d in made]
    assert all(len(d.probabilities) > 1 for d in made), [d.eligibility for d in made]
    for d in made:
        local = (d.decision_us - MIDNIGHT) // MIN % 1440
        send = 0.0 if local < 15 * 60 else 1.0
        assert d.probabilities["none"] == pytest.approx(1 - send), local
        assert (d.nudge is not None) == (send == 1.0)

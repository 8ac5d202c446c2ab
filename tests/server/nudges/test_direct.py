"""sim/direct's ceiling: a cold start, then a policy that knows the simulator's truth."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pulsesync.server.nudges.sim.behavior import (
    BASE_RESPONSE,
    MAX_RESPONSE,
    burden,
    day_plan,
    people,
    time_of_day,
)
from pulsesync.server.nudges.sim.direct import SLOTS, ceiling, known_probability, schedule_gain
from pulsesync.server.nudges.sim.trial import WALK

PERSONS = people(12, 3)
PLANS = [[day_plan(p, day, 3) for day in range(10)] for p in PERSONS]


def test_the_truth_from_day_one_beats_every_fixed_time_at_one_a_day() -> None:
    best, sent = ceiling(PERSONS, PLANS, SLOTS, lambda m: 0.0, first_day=0, per_day=1)
    assert 0.9 <= sent <= 1.0
    for m in SLOTS:
        fixed, _ = schedule_gain(PERSONS, PLANS, [m])
        assert best > fixed, m


def test_the_cold_start_alone_is_what_it_sends() -> None:
    # No days of the oracle: the cold start's probability decides everything.
    assert ceiling(PERSONS, PLANS, SLOTS, lambda m: 0.0, first_day=10, per_day=2) == (0.0, 0.0)
    always, sent = ceiling(PERSONS, PLANS, SLOTS, lambda m: float(m == 930), 10, 2)
    # Sending at 15:30 whenever a type is eligible: the fixed schedule's nudges (its types
    # drawn from another stream, so its gain is close, not equal).
    fixed, fixed_sent = schedule_gain(PERSONS, PLANS, [930])
    assert sent == fixed_sent
    assert abs(always - fixed) < 0.2 * fixed
    sometimes, fewer = ceiling(PERSONS, PLANS, SLOTS, lambda m: 0.3 * (m == 930), 10, 2)
    assert 0.15 * sent < fewer < 0.45 * sent
    assert 0.0 < sometimes < always


def test_a_daily_cap_stops_the_cold_start_for_the_day() -> None:
    send_all = lambda m: 1.0  # noqa: E731
    uncapped, sent = ceiling(PERSONS, PLANS, SLOTS, send_all, first_day=10, per_day=2)
    one, one_sent = ceiling(PERSONS, PLANS, SLOTS, send_all, 10, 2, daily_cap=1)
    assert sent > 1.0
    assert 0.9 <= one_sent <= 1.0  # the first eligible point of each day, nothing after
    assert 0.0 < one < uncapped
    # A cap above what the cold start sends changes nothing.
    assert ceiling(PERSONS, PLANS, SLOTS, send_all, 10, 2, daily_cap=len(SLOTS)) == (
        uncapped,
        sent,
    )


def test_knowing_part_of_the_truth_ranks_by_that_part_only() -> None:
    # With every person equally responsive, the moment is all there is to know.
    alike = [replace(p, responsiveness=1.0) for p in PERSONS]
    assert ceiling(alike, PLANS, SLOTS, lambda m: 0.0, 0, 2, knows="moment") == ceiling(
        alike, PLANS, SLOTS, lambda m: 0.0, 0, 2, knows="all"
    )
    everything, _ = ceiling(PERSONS, PLANS, SLOTS, lambda m: 0.0, 0, 2)
    for part in ("person", "moment"):
        partial, sent = ceiling(PERSONS, PLANS, SLOTS, lambda m: 0.0, 0, 2, knows=part)
        assert sent == 2.0
        assert 0.0 < partial < everything, part
    # Not knowing the moment, only the time of day tells decision points of one day apart.
    p, d = PERSONS[0], PLANS[0][0]
    assert known_probability("person", p, WALK, d, 930, 3.0) == pytest.approx(
        min(MAX_RESPONSE, BASE_RESPONSE[WALK] * p.responsiveness * burden(3.0) * time_of_day(930))
    )
    with pytest.raises(ValueError, match="knows"):
        known_probability("nothing", p, WALK, d, 930, 0.0)  # type: ignore[arg-type]

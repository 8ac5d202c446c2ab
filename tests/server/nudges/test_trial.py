"""The HeartSteps V1 figures: computed from decision points and checked row by row."""

from __future__ import annotations

import math

import pytest

from pulsesync.server.nudges.sim.trial import TRIAL, Point, compare, figures

WALK, BREAK = "walking_suggestion", "break_from_sitting"


def test_figures_are_computed_as_the_trial_defines_them() -> None:
    pts = [
        Point(1, 2, 1, "none", 199.5),
        Point(1, 2, 1, "none", 199.5),
        Point(2, 2, 1, WALK, 299.5),
        Point(2, 3, 2, BREAK, 99.5),
    ]
    f = figures(pts)
    assert f["mean_after_none"] == pytest.approx(199.5)
    assert f["diff_walking"] == pytest.approx(100.0)
    assert f["ratio_walking"] == pytest.approx(100.0 / 199.5)
    assert f["log_walking"] == pytest.approx(300.0 / 200.0 - 1.0)  # log(0.5 + steps)
    assert f["diff_all"] == pytest.approx(0.0)
    assert f["diff_slot2"] == pytest.approx(100.0)
    assert math.isnan(f["diff_slot1"])  # no decision points there: a figure that cannot pass
    assert f["diff_week2"] != f["diff_week2"]  # nan: week 2 has no "none" point


def test_the_trial_itself_passes_every_row_and_each_row_can_fail() -> None:
    points = {row.name: row.point for row in TRIAL}
    assert all(c.ok for c in compare(points))
    assert len(compare(points)) == 3 * 3 + 5 * 2 + 6 + 1  # every row of the trial's table
    # The old simulator's kind of effect: rare long walks, ~1/3 the log effect, ~3x the steps.
    old = {**points, "log_all": 0.05, "diff_all": 36.0}
    failed = {c.row.name for c in compare(old) if not c.ok}
    assert failed == {"log_all"}
    # Headline rows must also be within 30% of the trial's point, not just inside its interval.
    inside = {**points, "log_walking": 0.30}
    assert {c.row.name for c in compare(inside) if not c.ok} == {"log_walking"}
    # An effect still there in week 4 (the trial's is gone after week 2) fails that row.
    late = {**points, "diff_week4": 200.0}
    assert {c.row.name for c in compare(late) if not c.ok} == {"diff_week4"}

"""The simulator against every HeartSteps V1 row, and the burden behind the trial's week pattern."""

from __future__ import annotations

import pytest

from pulsesync.server.nudges.sim.behavior import burden, burden_dose
from pulsesync.server.nudges.sim.calibrate import check
from pulsesync.server.nudges.sim.trial import TRIAL

WALK, BREAK = "walking_suggestion", "break_from_sitting"


def test_the_simulator_passes_every_trial_row() -> None:
    # Two seeds of 80 people over the trial's six weeks (~30,000 available decision points):
    # seeded, so the same figures every run; large enough that each row tests the simulator's
    # average, not one lucky cohort.
    cal = check(n_people=80, seeds=(7, 8))  # in this process: no pool to lose on a loaded machine
    assert len(cal.checks) == len(TRIAL)
    failed = {c.row.name: round(c.simulated, 3) for c in cal.checks if not c.ok}
    assert not failed, cal.table()
    fig = {c.row.name: c.simulated for c in cal.checks}
    # The shape, beyond the intervals: walking works better than anti-sedentary on the log
    # scale, lunch and mid-afternoon carry the effect, and it fades after the first week.
    assert fig["log_walking"] > fig["log_break"]
    assert min(fig["log_slot2"], fig["log_slot3"]) > max(fig["log_slot1"], fig["log_slot5"])
    assert fig["diff_week1"] > 2 * max(fig[f"diff_week{w}"] for w in range(3, 7))


def test_a_simulator_without_an_effect_fails_the_check() -> None:
    cal = check(n_people=20, seeds=(7,), base_response={WALK: 0.0, BREAK: 0.0})
    failed = {c.row.name for c in cal.checks if not c.ok}
    assert {"log_all", "log_walking"} <= failed


def test_the_dose_fades_between_nudges_and_each_nudge_adds_one() -> None:
    before, after = burden_dose(None, 0)
    assert (before, after) == (0.0, 1.0)
    before, after = burden_dose((1.0, 0), 14 * 1440)  # DOSE_DAYS later: 1/e of it is left
    assert before == pytest.approx(0.3679, abs=1e-3)
    assert after == pytest.approx(before + 1.0)
    assert burden(0.0) == 1.0
    assert burden(30.0) < 0.1 < burden(10.0) < 1.0

"""The simulator's runner: one deployment's log starts another (export, import, first model)."""

from __future__ import annotations

import tomllib
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from pulsesync.server.nudges.catalog import load_catalog
from pulsesync.server.nudges.importlog import read_records
from pulsesync.server.nudges.model import LoggedDecision
from pulsesync.server.nudges.sim.behavior import expected_walk_steps, people
from pulsesync.server.nudges.sim.runner import (
    LEARNED_BUDGET,
    START,
    ArmResult,
    learned_catalog,
    run_arm,
    trial_focus,
    trial_prior,
    true_gain,
)
from pulsesync.server.nudges.training import Evaluation, Scored
from pulsesync.timeutil import US_PER_MIN, US_PER_S


async def test_an_exported_log_is_imported_and_trained_on_before_the_first_day(
    tmp_path: Path,
) -> None:
    log = tmp_path / "earlier.jsonl"
    earlier = await run_arm(
        "randomized", people(8, 1007), 2, 1007, tmp_path / "earlier", export_log=log
    )
    records = list(read_records(log))
    assert len(records) == len(earlier.decisions) > 0
    # Dated to end before the next deployment starts.
    last = max(datetime.fromisoformat(r["decision_time"]) for _, r in records)
    assert last.timestamp() * US_PER_S < START

    catalog = learned_catalog() + "min_training_decisions = 20\n"
    later = await run_arm(
        "learned", people(8, 7), 1, 7, tmp_path / "later",
        train_day=5, catalog_text=catalog, prior_log=log,
    )  # fmt: skip
    assert later.extra["prior"] == {"decisions": len(records), "people": 8}
    (first,) = later.extra["evaluations"]  # before day 0 only: day 5 is never reached
    assert first["minute"] == 0
    assert first["against"] == "randomized"
    assert first["decisions"] == len(records)
    assert later.promote_minute == (0 if first["promoted"] else None)
    assert first["forced"] is False

    # The diagnostic: the first candidate is promoted whatever the gate said, and says so
    # (no simulated day needed: the import and the first training come before day 0).
    forced = await run_arm(
        "learned", people(8, 7), 0, 7, tmp_path / "forced",
        train_day=5, catalog_text=catalog, prior_log=log, promote_first=True,
    )  # fmt: skip
    (first,) = forced.extra["evaluations"]
    assert first["forced"] is True
    assert first["promoted"] is True
    assert forced.promote_minute == 0


def test_the_learned_arms_cold_start_follows_the_trials_slot_effects() -> None:
    # HeartSteps' steps difference per slot: -16, +22, +50, +23, -3.
    before, bands = trial_prior(load_catalog().policy.schedule_min)
    assert before == 0.03
    assert bands == {"10:22": 0.264, "13:52": 0.6, "16:45": 0.276, "19:15": 0.03}
    text = learned_catalog(cold_start="proportional", top=0.6)
    policy = load_catalog(overrides=tomllib.loads(text)).policy
    assert policy.schedule_min == load_catalog().policy.schedule_min
    assert policy.cold_start_probability(15 * 60 + 30) == 0.6
    assert policy.cold_start_probability(8 * 60 + 30) == 0.03
    assert policy.daily_budget == LEARNED_BUDGET
    with pytest.raises(ValueError, match="5 daily slots, the schedule 4"):
        trial_prior((510, 750, 930, 1080))


def test_the_focused_cold_start_adds_decision_points_where_the_trial_found_its_effect() -> None:
    # The third slot (15:30, +50 steps) is the strongest; its band runs from midway after
    # 12:15 (13:52) to midway before 18:00 (16:45); an hour apart is the global cooldown.
    points, before, bands = trial_focus(load_catalog().policy.schedule_min, 60)
    assert points == (510, 735, 870, 930, 990, 1080, 1230)
    assert before == 0.03
    assert bands == {"13:52": 0.6, "16:45": 0.03}
    # Closer spacing, more points; only inside the band.
    points, _, _ = trial_focus(load_catalog().policy.schedule_min, 45)
    assert [m for m in points if 832 <= m < 1005] == [840, 885, 930, 975]
    text = learned_catalog(cold_start="focused", top=0.6)
    policy = load_catalog(overrides=tomllib.loads(text)).policy
    assert policy.schedule_min == (510, 735, 870, 930, 990, 1080, 1230)
    assert policy.cold_start_probability(14 * 60 + 30) == 0.6
    assert policy.cold_start_probability(12 * 60 + 15) == 0.03
    assert policy.cold_start_probability(17 * 60) == 0.03
    with pytest.raises(ValueError, match="5 daily slots, the schedule 4"):
        trial_focus((510, 750, 930, 1080), 60)
    with pytest.raises(ValueError, match="spacing_min must be positive"):
        trial_focus((510, 735, 930, 1080, 1230), 0)
    with pytest.raises(ValueError, match="cold_start must be"):
        learned_catalog(cold_start="uniform")


def test_the_learned_arms_cold_start_scales_from_its_top_probability() -> None:
    # `top` is the probability at the trial's strongest slot; the proportional bands follow it
    # (+22 / +50 of it at 12:15), the focused band is it; the floor stays.
    text = learned_catalog(cold_start="proportional", top=0.8)
    policy = load_catalog(overrides=tomllib.loads(text)).policy
    assert policy.cold_start_probability(15 * 60 + 30) == 0.8
    assert policy.cold_start_probability(12 * 60 + 15) == pytest.approx(0.8 * 22 / 50, abs=1e-3)
    assert policy.cold_start_probability(8 * 60 + 30) == 0.03
    text = learned_catalog(2.0, cold_start="focused", top=0.8, evaluation_days=0, daily_cap=None)
    policy = load_catalog(overrides=tomllib.loads(text)).policy
    assert [policy.cold_start_probability(m) for m in (870, 930, 990)] == [0.8, 0.8, 0.8]
    assert policy.cold_start_probability(12 * 60 + 15) == 0.03
    assert policy.daily_budget == 2.0
    assert policy.evaluation_days == 0.0
    assert policy.daily_cap == load_catalog().policy.daily_cap
    capped = learned_catalog(cold_start="focused", top=0.9, daily_cap=2)
    assert load_catalog(overrides=tomllib.loads(capped)).policy.daily_cap == 2
    triggered = learned_catalog(sedentary_trigger=True, support_sends=None)
    policy = load_catalog(overrides=tomllib.loads(triggered)).policy
    assert policy.sedentary_trigger_min == load_catalog().policy.sedentary_trigger_min
    assert policy.support_sends == load_catalog().policy.support_sends == 0.0
    # The defaults: the focused cold start at 0.9, at most two a person-day, decisions only at
    # the schedule's times (no one sits long enough to trigger one), a budget of 1.7, support
    # of 50 sends, the catalog's own evaluation window.
    default = load_catalog(overrides=tomllib.loads(learned_catalog())).policy
    assert default.schedule_min == (510, 735, 870, 930, 990, 1080, 1230)
    assert [default.cold_start_probability(m) for m in (870, 930, 990)] == [0.9, 0.9, 0.9]
    assert default.cold_start_probability(12 * 60 + 15) == 0.03
    assert default.daily_cap == 2
    assert default.sedentary_trigger_min > 1440 > load_catalog().policy.sedentary_trigger_min
    assert (default.daily_budget, default.support_sends) == (LEARNED_BUDGET, 50.0) == (1.7, 50.0)
    assert default.evaluation_days == load_catalog().policy.evaluation_days


async def test_each_decisions_one_step_truth_is_what_the_simulated_person_then_met(
    tmp_path: Path,
) -> None:
    """The counterfactual table (what each type would cause at each decision point) agrees,
    at every delivered nudge, with the response probability the person then met: same dose,
    same moment, same device."""
    arm = await run_arm("randomized", people(8, 11), 2, 11, tmp_path / "arm")
    assert arm.responses
    assert len(arm.one_step) >= len(arm.decisions)
    for i, minute, kind, prob, _ in arm.responses:
        assert arm.one_step[(i, minute)][kind] == pytest.approx(prob * expected_walk_steps(kind))
    # Points where nothing was sent have their counterfactuals too, with the same dose.
    sent = {(i, minute) for i, minute, *_ in arm.responses}
    assert any(
        key not in sent and max(v.values(), default=0) > 0 for key, v in arm.one_step.items()
    )


def test_the_truth_of_an_estimate_is_the_policies_difference_over_the_scored_decisions() -> None:
    actions = ("none", "walking_suggestion", "break_from_sitting")
    result = ArmResult("learned", [], np.zeros((2, 10)), 0.0, {}, 0, [])
    result.one_step = {
        (0, 600): {"walking_suggestion": 30.0, "break_from_sitting": 10.0},
        (1, 600): {"walking_suggestion": 6.0, "break_from_sitting": 2.0},
    }
    users = {41: 0, 42: 1}

    def at(user: int, minute: int) -> LoggedDecision:
        return LoggedDecision(
            user,
            START + minute * US_PER_MIN,
            {},
            {},
            {a: 1 / 3 for a in actions},
            "none",
            1 / 3,
            0.0,
        )

    always_walk = np.array([[0.0, 1.0, 0.0]] * 2)
    coin = np.array([[0.5, 0.25, 0.25]] * 2)
    scored = Scored((at(41, 600), at(42, 600)), actions, always_walk, coin)
    ev = Evaluation(1, "randomized", 2, {}, True, scored=scored)
    # Person 0: 30 - (7.5 + 2.5) = 20; person 1: 6 - (1.5 + 0.5) = 4; mean 12.
    assert true_gain(result, ev, users) == pytest.approx(12.0)
    same = Evaluation(
        1, "randomized", 2, {}, False, scored=Scored(scored.decisions, actions, coin, coin)
    )
    assert true_gain(result, same, users) == 0.0
    # A scored decision the arm did not make (an imported one): no truth to give.
    imported = Scored((at(-3, 600),), actions, always_walk[:1], coin[:1])
    assert (
        true_gain(result, Evaluation(1, "randomized", 1, {}, True, scored=imported), users) is None
    )

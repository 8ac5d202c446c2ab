"""The learned policy's daily budget: a send threshold calibrated on the last week of decisions."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest

from pulsesync.server.nudges.catalog import load_catalog
from pulsesync.server.nudges.model import (
    BUDGET_DAYS,
    LoggedDecision,
    OutcomeModel,
    budget_threshold,
    local_day,
    train,
)
from pulsesync.server.nudges.ope import policy_matrix
from pulsesync.server.nudges.pacing import BudgetPacer
from pulsesync.server.nudges.policy import randomized
from pulsesync.timeutil import US_PER_DAY

CATALOG = load_catalog()
ACTIONS = CATALOG.actions
NONE = ACTIONS.index("none")
WALK, BREAK = "walking_suggestion", "break_from_sitting"
SLOTS = (510, 750, 930, 1080, 1230)
FLOOR = 0.03
MIN_GAIN = 20.0


def drifting_logs(n_users: int, days: int, seed: int) -> list[LoggedDecision]:
    """Randomized logs, five decision points a day: a walking suggestion adds
    400 x exp(-day / 14) steps when the person has sat for over an hour, a tenth of that
    otherwise (habituation: the gains of the first week are ~4x those of the last); a break
    suggestion adds nothing. At one point in five only sending nothing is eligible."""
    rng = random.Random(seed)
    out = []
    for day in range(days):
        for minute in SLOTS:
            for u in range(1, n_users + 1):
                sed = rng.uniform(0, 120)
                options = ["none"] if rng.random() < 0.2 else ["none", WALK, BREAK]
                probs = randomized(options, 0.6)
                chosen = rng.choices(list(probs), weights=list(probs.values()))[0]
                y = max(0.0, rng.gauss(200, 50))
                if chosen == WALK:
                    y += 400.0 * math.exp(-day / 14) * (1.0 if sed > 60 else 0.1)
                features = {
                    "sedentary_min": sed,
                    "local_minute": float(minute),
                    "days_since_first_nudge": float(day),
                }
                at = (day * 1440 + minute) * 60_000_000
                out.append(LoggedDecision(u, at, features, {}, probs, chosen, probs[chosen], y))
    return out


@pytest.fixture(scope="module")
def trained() -> tuple[list[LoggedDecision], OutcomeModel]:
    data = drifting_logs(30, 28, 1)
    model = train(
        data, ACTIONS, "candidate", daily_budget=1.0, min_gain=MIN_GAIN, exploration_floor=FLOOR
    )
    return data, model


def _rate(
    model: OutcomeModel, decisions: list[LoggedDecision]
) -> tuple[float, npt.NDArray[np.float64]]:
    """The policy's expected nudges per person-day on decisions (exploration included), and
    its probabilities (policy.greedy_with_floor, as the server computes them)."""
    settings = replace(CATALOG.policy, exploration_floor=FLOOR)
    q = model.predict_many(decisions, ACTIONS)
    pi = policy_matrix(decisions, ACTIONS, settings, q, model.min_gain(MIN_GAIN))
    days = {(d.user_id, local_day(d)) for d in decisions}
    return float((1.0 - pi[:, NONE]).sum()) / len(days), pi


def test_the_policy_sends_its_daily_budget_on_the_last_week_despite_habituation(
    trained: tuple[list[LoggedDecision], OutcomeModel],
) -> None:
    data, model = trained
    last = data[-1].decision_us - int(BUDGET_DAYS * US_PER_DAY)
    recent = [d for d in data if d.decision_us >= last]
    first_week = [d for d in data if d.decision_us < 7 * US_PER_DAY]
    rate, pi = _rate(model, recent)
    # At most the budget (the exploration floor's sends included), and not far below it.
    assert 0.9 <= rate <= 1.0 + 1e-9, rate
    # The same threshold sends more on the first week, whose predicted gains were larger: a
    # threshold set over the whole log would send well under the budget on recent days.
    early_rate, _ = _rate(model, first_week)
    assert early_rate > 1.3 * rate, (early_rate, rate)
    # The greedy sends go to the sedentary contexts where a walking suggestion works.
    walk = ACTIONS.index(WALK)
    greedy = pi[:, walk] > 0.5
    sed = np.array([d.features["sedentary_min"] for d in recent])
    assert greedy.sum() > 0
    assert (sed[greedy] > 60).mean() > 0.9
    assert pi[:, ACTIONS.index(BREAK)].max() <= FLOOR + 1e-9


def test_a_budget_below_the_exploration_alone_leaves_only_the_floor() -> None:
    data = drifting_logs(10, 10, 2)
    model = train(
        data, ACTIONS, "candidate", daily_budget=0.05, min_gain=MIN_GAIN, exploration_floor=FLOOR
    )
    _, pi = _rate(model, data)
    choice = np.array([len(d.options) > 1 for d in data])
    # Exploration alone sends 2 x 3% at each of ~4 points with a choice a day (> 0.05): the
    # threshold is above every predicted gain, so sending nothing keeps the greedy mass.
    assert np.allclose(pi[choice, NONE], 1.0 - 2 * FLOOR)
    assert np.allclose(pi[~choice, NONE], 1.0)


def test_no_budget_means_the_threshold_is_the_minimum_gain() -> None:
    data = drifting_logs(10, 10, 3)
    model = train(data, ACTIONS, "candidate", daily_budget=None, min_gain=MIN_GAIN)
    assert model.send_threshold == MIN_GAIN


def test_the_catalog_reads_the_daily_budget() -> None:
    assert load_catalog().policy.daily_budget == 1.0
    assert load_catalog(overrides={"policy": {"daily_budget": 0}}).policy.daily_budget is None
    assert load_catalog(overrides={"policy": {"daily_budget": 2.5}}).policy.daily_budget == 2.5
    with pytest.raises(ValueError, match="daily_budget"):
        load_catalog(overrides={"policy": {"daily_budget": 7}})
    with pytest.raises(ValueError, match="daily_budget"):
        load_catalog(overrides={"policy": {"daily_budget": -1}})
    # The key it replaced, or any key the policy does not read, is refused, not ignored.
    with pytest.raises(ValueError, match=r"replaced by policy\.daily_budget"):
        load_catalog(overrides={"policy": {"send_budget": 0.2}})
    with pytest.raises(ValueError, match=r"unknown key.*daily_bugdet"):
        load_catalog(overrides={"policy": {"daily_bugdet": 2}})


def test_the_pacer_keeps_the_budget_on_the_policys_own_decision_points() -> None:
    pacer = BudgetPacer(1.0, MIN_GAIN, FLOOR)
    rng = random.Random(4)
    hour = 3600 * 1_000_000
    trained = 195.0
    # Ten people, five decision points a day, three options at each; gains 0-200 steps.
    sent = 0.0
    for day in range(10):
        for slot in range(5):
            now = day * US_PER_DAY + (8 + 3 * slot) * hour
            pacer.refresh(now)
            threshold = pacer.threshold("v1", trained, now)
            if day == 0:
                assert threshold == trained  # a day of its own decisions first
            for person in range(10):
                gain = rng.uniform(0, 200)
                pacer.record("v1", (person, day), now, gain, 3)
                if day >= 7:
                    sent += (1 - FLOOR) if gain > threshold else 2 * FLOOR
    # Exploration sends 5 x 2 x 3% = 0.3 a day; the other 0.7 need a gain above the threshold
    # at 0.7 / 0.91 of the five points (threshold ~170 of 200): one nudge a day per person on
    # the last three days, where the training threshold (195) sends ~0.4.
    assert 0.9 <= sent / 30 <= 1.1, sent / 30
    assert 160.0 < pacer.threshold("v1", trained, 10 * US_PER_DAY) < 180.0
    # A new model starts from its own training threshold.
    assert pacer.threshold("v2", 99.0, 10 * US_PER_DAY) == 99.0
    pacer.refresh(10 * US_PER_DAY + 2 * hour)
    assert pacer.threshold("v2", 99.0, 10 * US_PER_DAY + 2 * hour) == 99.0


def test_without_a_budget_the_pacer_keeps_the_training_threshold() -> None:
    pacer = BudgetPacer(None, MIN_GAIN, FLOOR)
    for day in range(3):
        pacer.record("v1", (1, day), day * US_PER_DAY, 500.0, 3)
        pacer.refresh(day * US_PER_DAY)
    assert pacer.threshold("v1", 42.0, 3 * US_PER_DAY) == 42.0


def test_budget_threshold_counts_exploration_exactly() -> None:
    best = np.array([300.0, 200.0, 100.0, 50.0, 10.0, -np.inf])
    options = np.array([3.0, 3.0, 2.0, 3.0, 3.0, 2.0])
    # One person-day. Exploration alone: 0.03 x (2 + 2 + 1 + 2 + 2 + 1) = 0.3.
    # Sending at the first point adds 1 - 0.09; at the second another 0.91: 2.12 in all; at
    # the third (two options) 0.94 more.
    assert budget_threshold(best, options, 1, 2.2, MIN_GAIN, FLOOR) == 100.0
    assert budget_threshold(best, options, 1, 2.0, MIN_GAIN, FLOOR) == 200.0
    assert budget_threshold(best, options, 1, 1.2, MIN_GAIN, FLOOR) == 300.0
    # Everything above the minimum gain fits: the threshold is the minimum gain.
    assert budget_threshold(best, options, 2, 3.0, MIN_GAIN, FLOOR) == MIN_GAIN
    # Exploration alone is over the budget: above every gain.
    assert budget_threshold(best, options, 1, 0.1, MIN_GAIN, FLOOR) == 300.0

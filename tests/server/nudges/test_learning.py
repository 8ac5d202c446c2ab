"""Training, off-policy estimates against a known truth, promotion and hot reload."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pulsesync.server.nudges.catalog import load_catalog
from pulsesync.server.nudges.features import FEATURE_NAMES
from pulsesync.server.nudges.model import (
    BASE_PARAMS,
    COLUMNS,
    EFFECT_PARAMS,
    LoggedDecision,
    OutcomeModel,
    _fit,
    row,
    train,
)
from pulsesync.server.nudges.ope import better, estimate, policy_matrix
from pulsesync.server.nudges.policy import randomized
from pulsesync.server.nudges.training import cross_fitted
from pulsesync.timeutil import US_PER_DAY
from tests.server.nudges.support import sqlite_registry

CATALOG = load_catalog()
# A budget of 2.5 nudges a day (of 5 decision points): room to send wherever walking works in
# these logs (half of the points), which the randomized policy does at only 0.3 of them.
WIDE = load_catalog(overrides={"policy": {"daily_budget": 2.5}})
ACTIONS = CATALOG.actions


def logged(n: int, seed: int) -> list[LoggedDecision]:
    """Randomized logging; walking adds 300 steps when sedentary_min > 60, else nothing."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        sed = rng.uniform(0, 120)
        options = ["none", "walking_suggestion"]
        probs = randomized(options, 0.6)
        chosen = "walking_suggestion" if rng.random() < 0.6 else "none"
        y = rng.gauss(200, 50) + (300 if chosen != "none" and sed > 60 else 0)
        out.append(
            LoggedDecision(1, i, {"sedentary_min": sed}, {}, probs, chosen, probs[chosen], y)
        )
    return out


def test_ips_and_dr_cover_the_true_value_of_a_known_policy() -> None:
    data = logged(3000, 1)
    n = len(data)
    # Target: walk exactly when sedentary > 60. True value: 200 + 300 * P(sed > 60) = 350.
    pi = np.zeros((n, len(ACTIONS)))
    for i, d in enumerate(data):
        pi[
            i, ACTIONS.index("walking_suggestion" if d.features["sedentary_min"] > 60 else "none")
        ] = 1.0
    q = np.full((n, len(ACTIONS)), 200.0)  # a poor outcome model: DR must still be right
    est = estimate(data, ACTIONS, pi, q)
    truth = 200 + 300 * np.mean([d.features["sedentary_min"] > 60 for d in data])
    for name in ("ips", "snips", "dr"):
        assert est[name].low <= truth <= est[name].high, (name, est[name], truth)


async def test_trained_model_learns_the_effect_and_registry_promotes_and_reloads(
    tmp_path: Path,
) -> None:
    data = logged(2000, 2)
    model = train(data, ACTIONS, "candidate")
    q = model.predict_many(data, ACTIONS)
    pi = policy_matrix(data, ACTIONS, CATALOG.policy, q)
    walk = ACTIONS.index("walking_suggestion")
    sed = np.array([d.features["sedentary_min"] for d in data])
    assert pi[sed > 80, walk].mean() > 0.8
    assert pi[sed < 40, walk].mean() < 0.2
    async with sqlite_registry(tmp_path) as reg:
        v = await reg.save(model, {"trained_on": 2000, "holdout_from_us": 0})
        assert await reg.current() is None
        assert not await reg.changed()  # nothing promoted yet
        await reg.promote(v, {"better": True})
        assert await reg.changed()
        assert not await reg.changed()
        loaded = await reg.load(v)
        assert (await reg.meta(v))["trained_on"] == 2000
    assert np.allclose(loaded.predict_many(data[:20], ACTIONS), q[:20])
    # Types never sent in training (here all but walking) are predicted like sending nothing.
    assert loaded.learned_actions == {"walking_suggestion"}
    for other in ("break_from_sitting", "resume_item", "study_reminder", "wind_down"):
        assert np.allclose(q[:, ACTIONS.index(other)], q[:, ACTIONS.index("none")])


def draw_three(rng: random.Random) -> tuple[dict[str, float], str]:
    """The randomized policy over none, walking and break: (its probabilities, the draw)."""
    probs = randomized(["none", "walking_suggestion", "break_from_sitting"], 0.6)
    u01 = rng.random()
    chosen = "none" if u01 < 0.4 else ("walking_suggestion" if u01 < 0.7 else "break_from_sitting")
    return probs, chosen


def people_logs(n_users: int, per_user: int, effect: float, seed: int) -> list[LoggedDecision]:
    """Randomized logs of several people; walking adds `effect` steps when sedentary > 60 min."""
    rng = random.Random(seed)
    out = []
    for u in range(1, n_users + 1):
        level = rng.gauss(200, 40)  # people differ in their baseline
        for i in range(per_user):
            sed = rng.uniform(0, 120)
            probs, chosen = draw_three(rng)
            y = level + sed + rng.gauss(0, 150)
            if chosen == "walking_suggestion" and sed > 60:
                y += effect
            out.append(
                LoggedDecision(u, i, {"sedentary_min": sed}, {}, probs, chosen, probs[chosen], y)
            )
    return out


def five_a_day(data: list[LoggedDecision]) -> list[LoggedDecision]:
    """The same decisions, each person's at five local times a day, day after day."""
    slots = (510, 750, 930, 1080, 1230)
    out = []
    for d in data:
        day, slot = divmod(int(d.decision_us), len(slots))
        at = (day * 1440 + slots[slot]) * 60_000_000
        features = {**d.features, "local_minute": float(slots[slot])}
        out.append(replace(d, decision_us=at, features=features))
    return sorted(out, key=lambda d: d.decision_us)


def test_cross_fitted_gate_promotes_a_real_gain_and_not_noise() -> None:
    good = cross_fitted(five_a_day(people_logs(8, 300, 300.0, 3)), WIDE, None)
    assert good["dr_diff"].low > 0.0, good["dr_diff"]
    assert better(good)
    null = cross_fitted(five_a_day(people_logs(8, 300, 0.0, 4)), WIDE, None)
    # Without any effect the learned policy only sends less: never estimated better.
    assert not better(null), null["dr_diff"]


def test_model_prefers_the_type_that_works_and_respects_the_daily_budget() -> None:
    data = five_a_day(people_logs(6, 400, 300.0, 5))
    floor = CATALOG.policy.exploration_floor
    model = train(
        data, ACTIONS, "candidate", daily_budget=1.5, min_gain=20.0, exploration_floor=floor
    )
    q = model.predict_many(data, ACTIONS)
    pi = policy_matrix(data, ACTIONS, CATALOG.policy, q, model.min_gain(20.0))
    walk, brk = ACTIONS.index("walking_suggestion"), ACTIONS.index("break_from_sitting")
    sed = np.array([d.features["sedentary_min"] for d in data])
    greedy_walk = pi[:, walk] > 0.5
    # The budget (1.5 a day of 5 points, exploration included) is smaller than the share of
    # contexts where walking works (half): the sends it keeps are the ones that work.
    assert (sed[greedy_walk] > 60).mean() > 0.9
    assert 0.15 < greedy_walk.mean() <= 0.3
    assert pi[:, brk].max() <= floor + 1e-9
    sends = 1.0 - pi[:, ACTIONS.index("none")]
    # 80 days x 6 people; the threshold was set on the last week, the rate holds on all of it.
    assert sends.sum() / (80 * 6) <= 1.5 + 0.1


def test_an_incumbent_model_is_scored_only_on_decisions_it_was_not_trained_on() -> None:
    # No effect at all: a candidate and the promoted model trained the same way are equal.
    data = five_a_day(people_logs(8, 600, 0.0, 11))
    cut = 60 * US_PER_DAY  # each person's first 300 decisions
    early = [d for d in data if d.decision_us < cut]
    p = WIDE.policy
    current = train(
        early,
        ACTIONS,
        "current",
        daily_budget=p.daily_budget,
        min_gain=p.min_gain_steps,
        exploration_floor=p.exploration_floor,
    )
    # Scored on its own training decisions, the incumbent's greedy choices fit their noise and
    # it looks clearly better than an identical, cross-fitted candidate...
    in_sample = cross_fitted(early, WIDE, current)["dr_diff"]
    assert in_sample.high < 0.0, in_sample
    # ...scored on the decisions logged after its training, the two are not told apart.
    fresh = cross_fitted(data, WIDE, current, score_from_us=cut)["dr_diff"]
    assert fresh.low < 0.0 < fresh.high, fresh


def acting_logs(n_users: int, per_user: int, seed: int) -> list[LoggedDecision]:
    """Randomized logs where a walking suggestion works only through the people who act on it:
    they act 12% of the time when sedentary for over an hour, 1% otherwise, and acting adds
    a ~1000-step walk; nobody ever acts on a break suggestion; the outcome is otherwise noise."""
    rng = random.Random(seed)
    out = []
    for u in range(1, n_users + 1):
        for i in range(per_user):
            sed = rng.uniform(0, 120)
            probs, chosen = draw_three(rng)
            walk = chosen == "walking_suggestion"
            acted = walk and rng.random() < (0.12 if sed > 60 else 0.01)
            y = max(0.0, rng.gauss(300, 400)) + (rng.gauss(1000, 100) if acted else 0.0)
            out.append(
                LoggedDecision(
                    u, i, {"sedentary_min": sed}, {}, probs, chosen, probs[chosen], y, acted
                )
            )
    return out


async def test_acting_model_learns_where_people_act_and_what_an_act_adds(
    tmp_path: Path,
) -> None:
    data = acting_logs(10, 400, 21)
    model = train(data, ACTIONS, "candidate", min_gain=20.0)
    assert model.response is not None
    # The steps an act adds, from the residuals of acted against other walking suggestions.
    assert 800 < model.act_gain["walking_suggestion"] < 1200, model.act_gain
    q = model.predict_many(data, ACTIONS)
    walk, none = ACTIONS.index("walking_suggestion"), ACTIONS.index("none")
    sed = np.array([d.features["sedentary_min"] for d in data])
    effect = q[:, walk] - q[:, none]
    # True effects: 120 steps when sedentary, 10 otherwise.
    assert 60 < np.median(effect[sed > 70]) < 200
    assert np.median(effect[sed < 50]) < 40
    pi = policy_matrix(data, ACTIONS, CATALOG.policy, q, model.min_gain(20.0))
    assert pi[sed > 70, walk].mean() > 0.8
    assert pi[sed < 50, walk].mean() < 0.2
    # Sent a thousand times and never acted on: the pooled act gain times a chance of acting
    # near zero. The break suggestion only ever gets the exploration floor.
    brk = ACTIONS.index("break_from_sitting")
    assert model.act_gain["break_from_sitting"] == pytest.approx(
        model.act_gain["walking_suggestion"], rel=0.05
    )
    assert np.abs(q[:, brk] - q[:, none]).max() < 20.0
    assert pi[:, brk].max() <= CATALOG.policy.exploration_floor + 1e-9
    # The acting model is saved and loaded with the others.
    async with sqlite_registry(tmp_path) as reg:
        loaded = await reg.load(await reg.save(model, {}))
    assert loaded.act_gain == model.act_gain
    assert np.allclose(loaded.predict_many(data[:50], ACTIONS), q[:50])


def test_acting_model_needs_enough_acts() -> None:
    data = [replace(d, acted=False) for d in acting_logs(4, 300, 22)]
    model = train(data, ACTIONS, "candidate")
    assert model.response is None
    assert model.act_gain == {}


def test_net_estimate_counts_the_cost_of_each_nudge() -> None:
    # No effect at all: sending half as often reaches the same steps with fewer interruptions.
    data = people_logs(8, 300, 0.0, 23)
    n = len(data)
    walk, none = ACTIONS.index("walking_suggestion"), ACTIONS.index("none")
    pi_cur = policy_matrix(data, ACTIONS, CATALOG.policy, None)
    pi_new = np.zeros((n, len(ACTIONS)))
    pi_new[:, walk], pi_new[:, none] = 0.3, 0.7
    q = np.zeros((n, len(ACTIONS)))
    est = estimate(data, ACTIONS, pi_new, q, baseline_pi=pi_cur, send_cost=20.0)
    sends_cur = 1.0 - pi_cur[:, none].mean()
    assert abs(est["dr_diff"].value) < 15.0
    assert est["dr_diff"].low < 0.0 < est["dr_diff"].high
    cost_saved = 20.0 * (sends_cur - 0.3)
    assert est["net_diff"].value == pytest.approx(est["dr_diff"].value + cost_saved)
    # Without a cost the two are the same estimate.
    free = estimate(data, ACTIONS, pi_new, q, baseline_pi=pi_cur)
    assert free["net_diff"].value == pytest.approx(free["dr_diff"].value)


async def test_a_model_saved_before_an_input_was_added_still_loads_and_predicts(
    tmp_path: Path,
) -> None:
    # A model from before `action_past_response` existed: its boosters read one column fewer.
    data = people_logs(4, 300, 300.0, 31)
    old_columns = COLUMNS[:-1]
    x = np.array([row(d.features, d.past_gain, ACTIONS.index(d.chosen), d.chosen) for d in data])
    y = np.array([d.outcome for d in data])
    base = _fit(x[:, : len(FEATURE_NAMES)], y, None, FEATURE_NAMES, (), BASE_PARAMS, 20)
    effect = _fit(x[:, : len(old_columns)], y, None, old_columns, (), EFFECT_PARAMS, 20)
    old = OutcomeModel(base, effect, ACTIONS, "old", columns=old_columns)
    async with sqlite_registry(tmp_path) as reg:
        loaded = await reg.load(await reg.save(old, {}))
    assert loaded.columns == old_columns
    assert np.allclose(loaded.predict_many(data, ACTIONS), old.predict_many(data, ACTIONS))
    with pytest.raises(ValueError, match="other inputs"):
        OutcomeModel(base, effect, ACTIONS, "odd", columns=("steps_30", *old_columns))

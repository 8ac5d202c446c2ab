"""The outcome model learns a separate effect per nudge type."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from pulsesync.server.nudges.catalog import load_catalog
from pulsesync.server.nudges.features import hour_bucket
from pulsesync.server.nudges.model import LoggedDecision, OutcomeModel, train
from pulsesync.server.nudges.policy import randomized
from tests.server.nudges.support import sqlite_registry

ACTIONS = load_catalog().actions
WALK, BREAK = "walking_suggestion", "break_from_sitting"
SLOTS = (510, 735, 930, 1080, 1230)  # local minute of the five daily decision points


def two_type_logs(
    n_users: int, per_user: int, seed: int, acting: bool = False
) -> list[LoggedDecision]:
    """HeartSteps-like randomization (0.4 none, 0.3 each type) against an outcome whose spread
    is ~150 steps: walking works at lunch and mid-afternoon, a break in the evening, neither
    otherwise. acting False: a nudge that works adds 100 steps. acting True: the device's
    ACTED feedback, a nudge that works acted on 40% of the time and any other 5%; an act adds
    250 steps."""
    rng = random.Random(seed)
    out = []
    for u in range(1, n_users + 1):
        level = rng.gauss(230, 40)
        for i in range(per_user):
            sed = rng.uniform(0, 120)
            minute = rng.choice(SLOTS)
            probs = randomized(["none", WALK, BREAK], 0.6)
            chosen = rng.choices(list(probs), weights=list(probs.values()))[0]
            y = level + 0.5 * sed + rng.gauss(0, 150)
            works = (chosen == WALK and minute in (735, 930)) or (
                chosen == BREAK and minute >= 1080
            )
            acted = acting and chosen != "none" and rng.random() < (0.4 if works else 0.05)
            y += 250.0 * acted if acting else 100.0 * works
            features = {"sedentary_min": sed, "local_minute": float(minute)}
            out.append(LoggedDecision(u, i, features, {}, probs, chosen, probs[chosen], y, acted))
    return out


async def test_learned_effects_differ_by_type_where_one_works_and_the_other_does_not(
    tmp_path: Path,
) -> None:
    data = two_type_logs(20, 200, 3)
    model = train(data, ACTIONS, "candidate")
    q = model.predict_many(data, ACTIONS)
    none = q[:, ACTIONS.index("none")]
    walk_over_break = (q[:, ACTIONS.index(WALK)] - none) - (q[:, ACTIONS.index(BREAK)] - none)
    minute = np.array([d.features["local_minute"] for d in data])
    midday, evening = np.isin(minute, (735, 930)), minute >= 1080
    assert {WALK, BREAK} <= model.learned_actions
    # True difference: +100 at midday, -100 in the evening. A single booster with the type as
    # a column learned ~+4 in both.
    assert walk_over_break[midday].mean() > 50.0, walk_over_break[midday].mean()
    assert walk_over_break[evening].mean() < -50.0, walk_over_break[evening].mean()
    # The per-type boosters survive a save and load.
    async with sqlite_registry(tmp_path) as registry:
        version = await registry.save(model, {})
        again = (await registry.load(version)).predict_many(data[:50], ACTIONS)
    assert np.allclose(again, q[:50])


async def test_the_acting_model_tells_the_types_apart_where_people_act_on_one_and_not_the_other(
    tmp_path: Path,
) -> None:
    data = two_type_logs(20, 200, 3, acting=True)
    model = train(data, ACTIONS, "candidate")
    assert model.response is not None
    assert set(model.responses) == {WALK, BREAK}
    q = model.predict_many(data, ACTIONS)
    none = q[:, ACTIONS.index("none")]
    walk_over_break = (q[:, ACTIONS.index(WALK)] - none) - (q[:, ACTIONS.index(BREAK)] - none)
    minute = np.array([d.features["local_minute"] for d in data])
    midday, evening = np.isin(minute, (735, 930)), minute >= 1080
    # True difference: 250 x (0.40 - 0.05) = +87.5 at midday, -87.5 in the evening. The pooled
    # acting booster alone (the type an input column) predicted ~0 at both.
    assert walk_over_break[midday].mean() > 50.0, walk_over_break[midday].mean()
    assert walk_over_break[evening].mean() < -50.0, walk_over_break[evening].mean()
    async with sqlite_registry(tmp_path) as registry:
        loaded = await registry.load(await registry.save(model, {}))
    assert set(loaded.responses) == {WALK, BREAK}
    assert np.allclose(loaded.predict_many(data[:50], ACTIONS), q[:50])
    # A model saved before the per-type acting boosters (the pooled one only) still loads.
    parts = {k: v for k, v in model.parts().items() if not k.startswith("response.")}
    old = OutcomeModel.from_parts(
        parts,
        ACTIONS,
        "old",
        act_gain=model.act_gain,
        learned_actions=sorted(model.learned_actions),
    )
    assert old.responses == {}
    assert old.response is not None


async def test_support_scales_each_types_effect_by_how_often_the_log_sent_it_there(
    tmp_path: Path,
) -> None:
    # Breaks were never sent in the evening: there the model's break effect is extrapolation.
    data = [
        d
        for d in two_type_logs(20, 200, 3)
        if not (d.chosen == BREAK and d.features["local_minute"] >= 1080)
    ]
    plain = train(data, ACTIONS, "plain")
    held = train(data, ACTIONS, "held", support_sends=50.0)
    qp, qh = plain.predict_many(data, ACTIONS), held.predict_many(data, ACTIONS)
    none = ACTIONS.index("none")
    bucket = np.array([hour_bucket(int(d.features["local_minute"])) for d in data])
    for a in (WALK, BREAK):
        i = ACTIONS.index(a)
        for b in set(bucket.tolist()):
            n = sum(1 for d, db in zip(data, bucket, strict=True) if d.chosen == a and db == b)
            rows = bucket == b
            np.testing.assert_allclose(
                qh[rows, i] - qh[rows, none], (qp[rows, i] - qp[rows, none]) * n / (n + 50.0)
            )
    evening = bucket == hour_bucket(1080)
    brk = ACTIONS.index(BREAK)
    assert np.abs(qp[evening, brk] - qp[evening, none]).max() > 1.0
    assert np.all(qh[evening, brk] == qh[evening, none])
    async with sqlite_registry(tmp_path) as registry:
        loaded = await registry.load(await registry.save(held, {}))
    assert loaded.support == held.support
    assert np.allclose(loaded.predict_many(data[:50], ACTIONS), qh[:50])

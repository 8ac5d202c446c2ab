"""policy.evaluation_days: a candidate is scored on the latest days, not on weeks that have passed.

Responses change over weeks (people habituate); an estimate averaged over a log's early,
responsive days promises a gain the days to come no longer hold. These logs go through the
real path: written in the import format, imported into SQLite, trained and evaluated.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from pulsesync.server.nudges.catalog import Catalog, load_catalog
from pulsesync.server.nudges.importlog import import_file, write_jsonl
from pulsesync.server.nudges.model import LoggedDecision, recent_from
from pulsesync.server.nudges.policy import randomized
from pulsesync.server.nudges.training import (
    evaluate_candidate,
    logged_decisions,
    train_candidate,
)
from pulsesync.server.storage.db import Database
from pulsesync.server.storage.sqlite.nudges import SqliteNudgeStorage
from pulsesync.timeutil import US_PER_DAY, US_PER_MIN
from tests.server.nudges.support import sqlite_registry

SLOTS = (510, 750, 930, 1080, 1230)
DAYS = 28
FADES_ON_DAY = 21  # walking works before this day, not from it on
START_US = 1_700_006_400 * 1_000_000  # a midnight UTC


def fading_logs(n_people: int, seed: int) -> list[LoggedDecision]:
    """Randomized logs at five points a day; walking adds 300 steps when sedentary over an
    hour, but only in the first three weeks."""
    rng = random.Random(seed)
    out = []
    for person in range(1, n_people + 1):
        level = rng.gauss(200, 40)
        for day in range(DAYS):
            for minute in SLOTS:
                sed = rng.uniform(0, 120)
                options = ["none", "walking_suggestion", "break_from_sitting"]
                probs = randomized(options, 0.6)
                u = rng.random()
                chosen = options[0 if u < 0.4 else 1 if u < 0.7 else 2]
                y = max(0.0, level + sed + rng.gauss(0, 150))
                if chosen == "walking_suggestion" and sed > 60 and day < FADES_ON_DAY:
                    y += 300
                at = START_US + day * US_PER_DAY + minute * US_PER_MIN
                features = {"sedentary_min": sed, "local_minute": float(minute)}
                out.append(
                    LoggedDecision(person, at, features, {}, probs, chosen, probs[chosen], y)
                )
    return sorted(out, key=lambda d: d.decision_us)


def catalog(evaluation_days: float) -> Catalog:
    # A budget of 2.5 a day: room to send wherever walking works in these logs.
    return load_catalog(
        overrides={"policy": {"daily_budget": 2.5, "evaluation_days": evaluation_days}}
    )


@pytest.mark.parametrize("days", [0, 7])
async def test_a_fading_effect_is_promoted_only_when_every_day_is_scored(
    tmp_path: Path, days: int
) -> None:
    log = tmp_path / "fading.jsonl"
    write_jsonl(log, fading_logs(12, 3))
    cat = catalog(days)
    async with await Database.open(tmp_path / "db.sqlite") as db, sqlite_registry(tmp_path) as reg:
        storage = SqliteNudgeStorage(db)
        await import_file(storage, log, cat.actions)
        decisions = await logged_decisions(storage)
        version = await train_candidate(storage, cat, reg)
        ev = await evaluate_candidate(storage, cat, reg, version)
    dr = ev.estimates["dr_diff"]
    if days == 0:
        # Three weeks of 300-step walks dominate the average: promoted, on a gain the last week
        # (and the weeks after it) no longer has.
        assert ev.decisions == len(decisions)
        assert dr.low > 0.0, dr
        assert ev.better, ev.reason
    else:
        # Scored on the last seven days only, where walking adds nothing: not promoted.
        since = recent_from(decisions, 7)
        assert ev.decisions == sum(d.decision_us >= since for d in decisions)
        assert ev.decisions < len(decisions) / 3
        assert dr.low < 0.0 < dr.high or dr.high < 0.0, dr
        assert not ev.better, ev.reason
        assert (ev.scored_from_us, ev.scored_by) == (since, "evaluation_days")
    # What was scored travels with the verdict: those decisions, both policies on each.
    scored = ev.scored
    assert scored is not None
    assert scored.actions == tuple(cat.actions)
    assert len(scored.decisions) == ev.decisions
    assert min(d.decision_us for d in scored.decisions) >= ev.scored_from_us
    for pi in (scored.candidate, scored.current):
        assert pi.shape == (ev.decisions, len(cat.actions))
        assert np.allclose(pi.sum(axis=1), 1.0)
    assert "scored" not in ev.as_dict()


async def test_against_a_model_trained_later_only_the_decisions_after_its_training_are_scored(
    tmp_path: Path,
) -> None:
    log = tmp_path / "fading.jsonl"
    write_jsonl(log, fading_logs(12, 3))
    cat = catalog(7)
    async with await Database.open(tmp_path / "db.sqlite") as db, sqlite_registry(tmp_path) as reg:
        storage = SqliteNudgeStorage(db)
        await import_file(storage, log, cat.actions)
        decisions = await logged_decisions(storage)
        # A model trained up to three days before the latest decision, then promoted.
        trained_until = decisions[-1].decision_us - 3 * US_PER_DAY
        current = await train_candidate(storage, cat, reg)
        await reg.update_meta(current, trained_until_us=trained_until)
        await reg.promote(current, {})
        ev = await evaluate_candidate(storage, cat, reg, await train_candidate(storage, cat, reg))
    assert (ev.scored_from_us, ev.scored_by) == (trained_until, "promoted_model")
    assert ev.decisions == sum(d.decision_us >= trained_until for d in decisions)


def test_recent_from_takes_the_last_days_before_the_latest_decision() -> None:
    decisions = fading_logs(2, 1)
    last = decisions[-1].decision_us
    assert recent_from(decisions, 0) == 0
    assert recent_from([], 7) == 0
    assert recent_from(decisions, 7) == last - 7 * US_PER_DAY
    assert recent_from(decisions, 0.5) == last - US_PER_DAY // 2


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf")])
def test_evaluation_days_must_be_a_number_of_days(bad: float) -> None:
    with pytest.raises(ValueError, match=r"policy\.evaluation_days"):
        catalog(bad)

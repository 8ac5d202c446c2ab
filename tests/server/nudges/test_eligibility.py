"""Property tests: the rules are never violated, probabilities sum to one, routing picks the device in use."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pulsesync.server.nudges.catalog import NONE_ACTION, load_catalog
from pulsesync.server.nudges.eligibility import (
    NudgeProfile,
    Reachable,
    eligible,
    in_quiet_hours,
    route,
)
from pulsesync.server.nudges.features import Context, local_day, local_time
from pulsesync.server.nudges.policy import choose
from pulsesync.v1 import common_pb2

CATALOG = load_catalog()
MIN = 60_000_000
T0 = 1_767_225_600_000_000
ZONES = ["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata", "Pacific/Auckland"]
KINDS = [
    common_pb2.DEVICE_KIND_PHONE,
    common_pb2.DEVICE_KIND_DESKTOP,
    common_pb2.DEVICE_KIND_WEARABLE_BRIDGE,
]
ALL = frozenset({1, 2, 3, 4})


def ctx(sed: float, spm: float, stress: float, habitual: bool) -> Context:
    return Context({"steps_30": 0.0, "habitual_study": float(habitual)}, {}, None, sed, spm, stress)


scenario = st.fixed_dictionaries(
    {
        "now": st.integers(T0, T0 + 60 * 1440 * MIN),
        "tz": st.sampled_from(ZONES),
        "quiet": st.tuples(st.integers(0, 1439), st.integers(0, 1439)),
        "muted": st.frozensets(st.sampled_from([t.name for t in CATALOG.types])),
        "granted": st.sampled_from([ALL, frozenset({1, 2, 4}), frozenset()]),
        "history": st.lists(
            st.tuples(st.sampled_from([t.name for t in CATALOG.types]), st.integers(0, 48 * 60)),
            max_size=12,
        ),
        "sed": st.floats(0, 240),
        "spm": st.floats(0, 150),
        "stress": st.floats(0, 1),
        "habitual": st.booleans(),
        "devices": st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 180)), max_size=4),
        "title": st.sampled_from([None, "Chapter 3"]),
        "seed": st.integers(0, 2**32),
        "model": st.booleans(),
    }
)


@settings(max_examples=400, deadline=None)
@given(scenario)
def test_rules_never_violated_and_probabilities_sum_to_one(s) -> None:
    now = s["now"]
    history = sorted((name, now - ago * MIN) for name, ago in s["history"])
    profile = NudgeProfile(s["tz"], s["quiet"][0], s["quiet"][1], s["muted"], s["title"])
    devices = [
        Reachable(pk + 1, kind, (now - ago * MIN) if ago < 180 else 0)
        for pk, (kind, ago) in enumerate(s["devices"])
    ]
    e = eligible(CATALOG, now_us=now, granted=s["granted"], profile=profile, history=history,
                 context=ctx(s["sed"], s["spm"], s["stress"], s["habitual"]), devices=devices)  # fmt: skip
    assert e.options[0] == NONE_ACTION
    p = CATALOG.policy
    lt = local_time(now, s["tz"])
    sent = [t for t in e.options if t != NONE_ACTION]
    today = [(n, at) for n, at in history if local_day(at, s["tz"]) == local_day(now, s["tz"])]
    for name in sent:
        t = CATALOG.type(name)
        assert common_pb2.CONSENT_CATEGORY_PERSONALIZATION in s["granted"]
        assert t.consent in s["granted"]
        assert not in_quiet_hours(lt.hour * 60 + lt.minute, *s["quiet"])
        assert name not in s["muted"]
        assert len(today) < p.daily_cap
        assert sum(1 for n, _ in today if n == name) < t.daily_cap
        assert all(now - at >= p.global_cooldown_us for _, at in history)
        assert all(now - at >= t.cooldown_us for n, at in history if n == name)
        dev = next(d for d in devices if d.device_pk == e.device_for[name])
        assert dev.kind in t.device_kinds
    predicted = (
        {o: random.Random(s["seed"]).uniform(0, 500) for o in e.options} if s["model"] else None
    )
    choice = choose(e.options, predicted, p, random.Random(s["seed"]))
    assert set(choice.probabilities) == set(e.options)
    assert abs(sum(choice.probabilities.values()) - 1.0) < 1e-9
    assert choice.chosen in e.options
    assert choice.probability == choice.probabilities[choice.chosen]
    if predicted is not None and len(e.options) > 1:
        floor = min(p.exploration_floor, 1 / len(e.options))
        assert all(v >= floor - 1e-12 for v in choice.probabilities.values())


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 10_000)), min_size=1, max_size=5),
    st.sampled_from([t.name for t in CATALOG.types]),
)
def test_route_picks_the_device_in_use(devs, name) -> None:
    t = CATALOG.type(name)
    devices = [Reachable(i + 1, kind, last) for i, (kind, last) in enumerate(devs)]
    chosen = route(t, devices)
    allowed = [d for d in devices if d.kind in t.device_kinds]
    if not allowed:
        assert chosen is None
        return
    active = [d for d in allowed if d.last_active_us > 0]
    if active:
        newest = max(d.last_active_us for d in active)
        assert next(d for d in devices if d.device_pk == chosen).last_active_us == newest
    else:
        assert chosen in {d.device_pk for d in allowed}


def test_quiet_hours_spanning_midnight() -> None:
    assert in_quiet_hours(23 * 60, 22 * 60, 7 * 60)
    assert in_quiet_hours(60, 22 * 60, 7 * 60)
    assert not in_quiet_hours(12 * 60, 22 * 60, 7 * 60)
    assert not in_quiet_hours(12 * 60, 0, 0)

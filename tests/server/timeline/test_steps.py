"""One rule for steps: SummarizeActivity's buckets, the nudge features and the steps outcome
agree on a person's steps, and all equal a brute-force reading of the rule."""

from __future__ import annotations

from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from pulsesync.server.nudges.batch_summary import summarize
from pulsesync.server.nudges.features import UserState
from pulsesync.server.timeline.aggregates import summarize_events
from pulsesync.server.timeline.steps import (
    StepMinutes,
    event_span,
    step_minute,
    total_steps,
)
from pulsesync.server.timeline.store import StoredEvent
from pulsesync.v1 import events_pb2

MIN = 60_000_000
T0 = 1_767_225_600_000_000  # a whole minute

# (device 0..2, seconds after T0, count): whole seconds hit minute boundaries often.
counts_st = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 3 * 3600), st.integers(0, 200)), max_size=80
)


def _oracle(counts: list[tuple[int, int, int]], start: int, end: int) -> int:
    """The rule read literally: minute = the one ending at or after t; per minute the largest
    device's sum; the range holds the minutes starting in it after rounding down."""
    per: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for dev, t, c in counts:
        per[-(-t // MIN) - 1][dev] += c
    lo, hi = start // MIN, end // MIN
    return sum(max(d.values()) for m, d in per.items() if lo <= m < hi)


def _absolute(raw: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    return [(dev, T0 + s * 1_000_000, c) for dev, s, c in raw]


def _stored(counts: list[tuple[int, int, int]]) -> list[StoredEvent]:
    return [
        StoredEvent(
            f"dev{dev}",
            1,
            seq,
            t,
            events_pb2.EVENT_KIND_STEPS,
            events_pb2.Event(steps=events_pb2.Steps(count=c)),
        )
        for seq, (dev, t, c) in enumerate(sorted(counts, key=lambda x: x[1]), start=1)
    ]


def test_a_count_belongs_to_the_minute_it_ends() -> None:
    assert step_minute(T0) == T0 // MIN - 1
    assert step_minute(T0 + 1) == T0 // MIN
    assert step_minute(T0 + MIN) == T0 // MIN


def test_two_devices_counting_one_walk_count_it_once() -> None:
    minutes = StepMinutes()
    minutes.add("phone", T0 + 30_000_000, 60)
    minutes.add("watch", T0 + 20_000_000, 50)
    minutes.add("watch", T0 + 50_000_000, 20)  # the watch's minute: 70, the phone's 60
    assert minutes.total(T0, T0 + MIN) == 70
    assert minutes.per_bucket(T0, T0 + 2 * MIN, MIN) == [70, 0]


@settings(max_examples=150, deadline=None)
@given(
    counts_st,
    st.integers(0, 2 * 3600 * 1_000_000),
    st.integers(1, 3 * 3600 * 1_000_000),
    st.integers(MIN, 40 * MIN),
)
def test_summary_buckets_follow_the_rule_and_add_up(raw, start_off, length, bucket) -> None:
    counts = _absolute(raw)
    start, end = T0 + start_off, T0 + start_off + length
    lo, hi = event_span(start, end)
    # What the store reads for a summary: every summary kind over the range, and steps over
    # the span whose counts land in its minutes.
    fetched = [e for e in _stored(counts) if min(lo, start) <= e.t_us < max(hi, end)]
    buckets = summarize_events(fetched, start, end, bucket)
    assert sum(b.steps for b in buckets) == _oracle(counts, start, end)
    for b in buckets:
        b_end = min(b.start_us + bucket, end)
        assert b.steps == _oracle(counts, b.start_us, b_end)
    assert total_steps(counts, start, end) == _oracle(counts, start, end)


@settings(max_examples=150, deadline=None)
@given(counts_st, st.integers(0, 4 * 3600 * 1_000_000), st.sampled_from([10, 30, 60, 120]))
def test_the_nudge_features_count_the_same_steps(raw, now_off, minutes) -> None:
    counts = _absolute(raw)
    now = T0 + now_off
    # Through the committed-batch summary, as ingest folds it.
    state = UserState()
    rows = [
        (0, dev, seq, t, events_pb2.EVENT_KIND_STEPS, e.SerializeToString(), t)
        for seq, (dev, t, c) in enumerate(counts, start=1)
        for e in [events_pb2.Event(steps=events_pb2.Steps(count=c))]
    ]
    plain = summarize(rows)
    if plain is not None:
        for dev, minute, n in plain[4]:
            state.add_minute_steps(minute, n, dev)
    want = _oracle(counts, now - minutes * MIN, now)
    assert state.steps_since(now, minutes) == want
    # And event by event.
    direct = UserState()
    for dev, t, c in counts:
        direct.add_steps(t, c, dev)
    assert direct.steps_since(now, minutes) == want

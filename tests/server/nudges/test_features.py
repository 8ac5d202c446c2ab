"""Incremental features: steps from two devices for the same minutes are not added up; heart
rate is sampled."""

from __future__ import annotations

import marshal

import pytest

from pulsesync.server.bus import CommittedBatch
from pulsesync.server.nudges.batch_summary import summarize
from pulsesync.server.nudges.features import RECENT_ALPHA, FeatureStore, UserState
from pulsesync.timeutil import US_PER_MIN
from pulsesync.v1 import events_pb2

T0 = 1_767_225_600_000_000


def test_steps_features_take_the_larger_device_per_minute() -> None:
    s = UserState()
    for m in range(1, 11):  # a 10-minute walk seen by the phone (100/min) and the watch (90/min)
        s.add_steps(T0 + m * US_PER_MIN, 100, device_pk=1)
        s.add_steps(T0 + m * US_PER_MIN, 90, device_pk=2)
    for m in range(11, 16):  # then only the watch
        s.add_steps(T0 + m * US_PER_MIN, 50, device_pk=2)
    now = T0 + 16 * US_PER_MIN
    assert s.steps_since(now, 30) == 10 * 100 + 5 * 50
    s.add_steps(T0 + 3 * US_PER_MIN, 30, device_pk=2)  # a late upload: the watch now leads minute 2
    assert s.steps_since(now, 30) == 9 * 100 + 120 + 5 * 50
    assert s.sedentary_min(now) == 1.0  # last moving minute 14, minute 15 still open


def _hr_row(t_us: int, bpm: int, seq: int) -> tuple[int, int, int, int, int, bytes, int]:
    ev = events_pb2.Event(event_id=f"e{seq}", seq=seq, heart_rate=events_pb2.HeartRate(bpm=bpm))
    return (1, 1, seq, t_us, events_pb2.EVENT_KIND_HEART_RATE, ev.SerializeToString(), t_us)


def test_heart_rate_is_sampled_every_five_minutes_not_every_notification() -> None:
    store = FeatureStore(15 * US_PER_MIN)
    # A strap notifying once a second for 20 minutes: 80 bpm, except one minute of 150 bpm
    # between two samples, which must not move the averages.
    rows = [_hr_row(T0 + i * 1_000_000, 150 if 150 <= i < 210 else 80, i + 1) for i in range(1200)]
    store.apply(1, CommittedBatch(rows))
    s = store.user(1)
    assert s.hr_sampled_us == T0 + 900 * 1_000_000  # samples at 0, 5, 10 and 15 minutes
    assert s.hr.baseline == pytest.approx(80.0)
    assert s.hr.recent == pytest.approx(80.0)
    assert s.device_last_us[1] == T0 + 1199 * 1_000_000  # every event still marks the device
    # A reading 5 minutes after the last sample is taken.
    store.apply(1, CommittedBatch([_hr_row(T0 + 1200 * 1_000_000, 110, 1201)]))
    assert s.hr.recent == pytest.approx(80.0 + RECENT_ALPHA * 30.0)


def _mixed_rows(n: int) -> list[tuple[int, int, int, int, int, bytes, int]]:
    """Two devices, one row every 7 s: heart rate, steps, feature use, screen views, sessions."""
    rows: list[tuple[int, int, int, int, int, bytes, int]] = []
    for i in range(n):
        device_pk = 1 + i % 2
        t_us = T0 + i * 7_000_000
        ev = events_pb2.Event(event_id=f"e{i}", seq=i + 1)
        match i % 5:
            case 0:
                ev.heart_rate.bpm = 60 + i % 50
                ev.heart_rate.rr_intervals_ms.extend([800.0 + i % 40, 790.0, 805.0])
            case 1:
                ev.steps.count = (i * 13) % 90
            case 2:
                ev.feature_use.app, ev.feature_use.feature = f"app{i % 3}", f"f{i % 4}"
            case 3:
                ev.screen_view.app, ev.screen_view.screen = f"app{i % 4}", "home"
            case _:
                ev.session_start.app = f"app{i % 5}"
        kind = {
            "heart_rate": events_pb2.EVENT_KIND_HEART_RATE,
            "steps": events_pb2.EVENT_KIND_STEPS,
            "feature_use": events_pb2.EVENT_KIND_FEATURE_USE,
            "screen_view": events_pb2.EVENT_KIND_SCREEN_VIEW,
            "session_start": events_pb2.EVENT_KIND_SESSION_START,
        }[ev.WhichOneof("payload") or ""]
        rows.append((1, device_pk, i + 1, t_us, kind, ev.SerializeToString(), t_us))
    return rows


@pytest.mark.parametrize("batch", [7, 60, 1000])
def test_a_batch_folds_like_its_events_one_by_one(batch: int) -> None:
    """The batch fold (C-level passes, steps summed per minute, the last app per device) ends
    in the state that folding every event on its own does."""
    rows = _mixed_rows(1000)
    one_by_one, batched = FeatureStore(15 * US_PER_MIN), FeatureStore(15 * US_PER_MIN)
    for row in rows:
        one_by_one.apply(1, CommittedBatch([row]))
    for lo in range(0, len(rows), batch):
        batched.apply(1, CommittedBatch(rows[lo : lo + batch]))
    assert batched.user(1) == one_by_one.user(1)
    assert one_by_one.user(1).hr.baseline is not None  # heart rate was sampled at all


def test_a_batch_folds_the_same_from_the_writers_summary() -> None:
    """Batches of one device, each with the summary the writer process sends over its pipe,
    fold to the state that summarizing them on the event loop gives."""
    rows = _mixed_rows(1000)
    here, from_writer = FeatureStore(15 * US_PER_MIN), FeatureStore(15 * US_PER_MIN)
    for lo in range(0, len(rows), 50):
        for device_pk in (1, 2):
            part = [r for r in rows[lo : lo + 50] if r[1] == device_pk]
            here.apply(1, CommittedBatch(part))
            sent = marshal.loads(marshal.dumps(summarize(part)))
            from_writer.apply(1, CommittedBatch(part, sent))
    assert from_writer.user(1) == here.user(1)
    assert here.user(1).steps_by_min
    assert here.user(1).device_app


def test_the_fold_takes_steps_from_the_summary_without_reading_rows() -> None:
    store = FeatureStore(15 * US_PER_MIN)
    minute = T0 // US_PER_MIN
    summary = (T0, T0, ((1, T0),), (events_pb2.EVENT_KIND_STEPS,), ((1, minute, 42),), ())
    store.apply(1, CommittedBatch([], summary))
    assert store.user(1).steps_by_min == {minute: 42}
    assert store.user(1).device_last_us == {1: T0}

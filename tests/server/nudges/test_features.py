"""Incremental features: steps from two devices for the same minutes are not added up; heart
rate is sampled."""

from __future__ import annotations

import pytest

from pulsesync.server.bus import CommittedBatch
from pulsesync.server.nudges.features import RECENT_ALPHA, US_PER_MIN, FeatureStore, UserState
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

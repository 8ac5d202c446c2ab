"""Incremental features: steps from two devices for the same minutes are not added up."""

from __future__ import annotations

from pulsesync.server.nudges.features import US_PER_MIN, UserState

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

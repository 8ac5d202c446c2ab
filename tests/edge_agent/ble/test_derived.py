"""Derived values: CSC rates across counter wrap-around, steps from cadence, RMSSD windows."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pulsesync.edge_agent.ble.derived import (
    MAX_CADENCE_GAP_S,
    CscCalculator,
    RmssdWindow,
    StepsFromCadence,
)
from pulsesync.edge_agent.ble.parsers import CrankData, CscMeasurement, WheelData
from pulsesync.hrv import rmssd_ms


def test_first_csc_measurement_only_primes():
    calc = CscCalculator(wheel_circumference_m=2.0)
    rates = calc.update(CscMeasurement(WheelData(10, 1000), CrankData(5, 1000)))
    assert rates.speed_m_per_s is None
    assert rates.cadence_rpm is None


def test_csc_speed_and_cadence_from_consecutive_counters():
    calc = CscCalculator(wheel_circumference_m=2.0)
    calc.update(CscMeasurement(WheelData(100, 0), CrankData(50, 0)))
    # 4 wheel revolutions in 1 s at 2 m each = 8 m/s; 1.5 crank revs in 1 s... use 2 revs in 1.5 s.
    rates = calc.update(CscMeasurement(WheelData(104, 1024), CrankData(52, 1536)))
    assert rates.speed_m_per_s == pytest.approx(8.0)
    assert rates.cadence_rpm == pytest.approx(80.0)


def test_csc_counters_and_event_times_wrap_around():
    calc = CscCalculator(wheel_circumference_m=2.105)
    calc.update(CscMeasurement(WheelData(0xFFFFFFFE, 0xFF00), CrankData(0xFFFF, 0xFE00)))
    # wheel: 0xFFFFFFFE -> 1 is 3 revolutions; time 0xFF00 -> 0x0100 is 512 ticks = 0.5 s
    # crank: 0xFFFF -> 0 is 1 revolution; time 0xFE00 -> 0x0000 is 512 ticks = 0.5 s -> 120 rpm
    rates = calc.update(CscMeasurement(WheelData(1, 0x0100), CrankData(0, 0x0000)))
    assert rates.speed_m_per_s == pytest.approx(3 * 2.105 / 0.5)
    assert rates.cadence_rpm == pytest.approx(120.0)


def test_csc_repeated_counters_give_no_rate():
    calc = CscCalculator()
    m = CscMeasurement(WheelData(7, 300), CrankData(3, 300))
    calc.update(m)
    rates = calc.update(m)
    assert rates.speed_m_per_s is None
    assert rates.cadence_rpm is None


@given(
    start=st.integers(0, 0xFFFFFFFF),
    revs=st.integers(0, 1000),
    t0=st.integers(0, 0xFFFF),
    ticks=st.integers(1, 0xFFFF),
)
def test_csc_speed_is_invariant_to_where_the_counters_start(start, revs, t0, ticks):
    calc = CscCalculator(wheel_circumference_m=1.0)
    calc.update(CscMeasurement(WheelData(start, t0)))
    rates = calc.update(CscMeasurement(WheelData((start + revs) % 2**32, (t0 + ticks) % 2**16)))
    assert rates.speed_m_per_s == pytest.approx(revs * 1024 / ticks)


def test_steps_integrate_cadence_and_carry_fractions():
    steps = StepsFromCadence(window_s=10.0)
    out = []
    for i in range(0, 31):
        w = steps.add(float(i), 90.0)  # 1.5 steps per second
        if w:
            out.append(w)
    assert [c for c, _ in out] == [15, 15, 15]
    assert all(span == pytest.approx(10.0) for _, span in out)


def test_steps_do_not_invent_steps_across_a_gap():
    steps = StepsFromCadence(window_s=30.0)
    steps.add(0.0, 120.0)
    steps.add(1.0, 120.0)  # 2 steps
    result = steps.add(1.0 + MAX_CADENCE_GAP_S + 30, 120.0)  # gap: nothing integrated
    assert result is not None
    assert result[0] == 2
    assert result[1] == pytest.approx(1.0 + MAX_CADENCE_GAP_S + 30)


def test_rmssd_known_answer():
    # successive differences 10, -20, 30 -> sqrt((100 + 400 + 900) / 3)
    assert rmssd_ms([800, 810, 790, 820]) == pytest.approx(math.sqrt(1400 / 3))
    assert rmssd_ms([800]) is None


def test_rmssd_window_closes_on_beat_time_and_filters_artefacts():
    window = RmssdWindow(window_s=10.0, min_intervals=5)
    assert window.add([1000.0, 1010.0, 990.0]) is None
    # a missed beat (2 RR merged) and an out-of-range value are skipped
    assert window.add([1990.0, 250.0]) is None
    assert window.add([1000.0, 1020.0, 1000.0]) is None  # 8.26 s of beats so far
    result = window.add([1010.0, 1000.0, 990.0])
    assert result is not None
    value, span_s, used = result
    assert used == 9
    assert span_s == pytest.approx((3000 + 1990 + 250 + 3020 + 3000) / 1000)
    assert value == pytest.approx(rmssd_ms([1000, 1010, 990, 1000, 1020, 1000, 1010, 1000, 990]))


def test_rmssd_window_with_too_few_clean_beats_yields_nothing():
    window = RmssdWindow(window_s=2.0, min_intervals=5)
    assert window.add([1000.0, 1000.0, 1000.0]) is None  # closed, but only 3 beats

"""Derived values: CSC rates across counter wrap-around, steps from cadence, RMSSD windows."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pulsesync.edge_agent.ble.derived import (
    MAX_CADENCE_GAP_S,
    MAX_CSC_SPEED_M_PER_S,
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


def test_csc_reset_forgets_stale_counters():
    # 100 s drop at ~8.4 m/s: without a reset the first pair spans the gap and aliases.
    calc = CscCalculator(wheel_circumference_m=2.105)
    calc.update(CscMeasurement(WheelData(1000, 0), CrankData(100, 0)), at_s=0.0)
    calc.reset()
    after = CscMeasurement(WheelData(1400, 40_000), CrankData(250, 40_000))
    assert calc.update(after, at_s=100.0).speed_m_per_s is None
    rates = calc.update(CscMeasurement(WheelData(1404, 41_024), CrankData(251, 40_683)), 101.0)
    assert rates.speed_m_per_s == pytest.approx(4 * 2.105)
    assert rates.cadence_rpm == pytest.approx(90.0, rel=0.01)


def test_csc_gap_longer_than_the_event_time_can_span_only_primes():
    # 100 s at 8 m/s: the 16-bit event time wraps, 100 s looks like 36 s -> 22.2 m/s.
    calc = CscCalculator(wheel_circumference_m=2.0)
    calc.update(CscMeasurement(WheelData(0, 0), None), at_s=10.0)
    revs, ticks = 400, (100 * 1024) % 0x10000
    rates = calc.update(CscMeasurement(WheelData(revs, ticks), None), at_s=110.0)
    assert rates.speed_m_per_s is None
    assert rates.rejected == 0


def test_csc_counter_reset_is_dropped_and_counted():
    calc = CscCalculator(wheel_circumference_m=2.105)
    calc.update(CscMeasurement(WheelData(5000, 1000), CrankData(800, 1000)), at_s=0.0)
    rates = calc.update(CscMeasurement(WheelData(2, 2024), CrankData(1, 2024)), at_s=1.0)
    assert rates.speed_m_per_s is None
    assert rates.cadence_rpm is None
    assert rates.rejected == 2
    # and the next pair from the reset counters is measured again
    rates = calc.update(CscMeasurement(WheelData(6, 3048), CrankData(2, 2707)), at_s=2.0)
    assert rates.speed_m_per_s == pytest.approx(4 * 2.105)


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
    speed = revs * 1024 / ticks
    if speed <= MAX_CSC_SPEED_M_PER_S:
        assert rates.speed_m_per_s == pytest.approx(speed)
        assert rates.rejected == 0
    else:  # faster than any bicycle: a counter glitch, dropped and counted
        assert rates.speed_m_per_s is None
        assert rates.rejected == 1


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


def test_rmssd_window_closes_on_kept_beat_time_and_filters_artefacts():
    window = RmssdWindow(window_s=10.0, min_intervals=5)
    # the first three beats only seed the reference
    assert window.add([1000.0, 1010.0, 990.0]) is None
    # a missed beat (2 RR merged) and an out-of-range value are dropped
    assert window.add([1000.0, 1990.0, 250.0]) is None
    assert window.add([1000.0, 1020.0, 1000.0, 1010.0, 1000.0, 990.0]) is None  # 7.02 s kept
    result = window.add([1005.0, 995.0, 1000.0])
    assert result is not None
    value, span_s, used = result
    assert used == 10
    assert span_s == pytest.approx(10.02)  # the kept beats only, not the dropped ones
    # differences only between adjacent kept beats, never across the dropped pair
    kept_runs = [[1000.0], [1000.0, 1020.0, 1000.0, 1010.0, 1000.0, 990.0, 1005.0, 995.0, 1000.0]]
    diffs = [b - a for run in kept_runs for a, b in itertools.pairwise(run)]
    assert value == pytest.approx(math.sqrt(sum(d * d for d in diffs) / len(diffs)))


def test_rmssd_filter_recovers_from_an_artefact_at_the_start_of_a_window():
    # One 1500 ms artefact, then 110 clean beats near 600 ms: the window is not lost.
    window = RmssdWindow(window_s=60.0)
    clean = [600.0 + (10.0 if i % 2 else -10.0) for i in range(110)]
    result = window.add([1500.0, *clean])
    assert result is not None
    value, span_s, used = result
    assert used >= 100
    assert value == pytest.approx(20.0)
    assert span_s == pytest.approx(used * 0.6, rel=0.02)
    assert span_s >= 60.0


def test_a_bogus_long_rr_neither_closes_a_window_nor_publishes_from_few_beats():
    # 8 s of beats then a bogus 64 s interval: no RMSSD 0.0 labelled as a 72 s window.
    window = RmssdWindow(window_s=60.0)
    assert window.add([800.0] * 10 + [64_000.0]) is None
    assert window.dropped >= 1
    # the window closes only once 60 s of kept beats are in, and says so
    result = None
    while result is None:
        result = window.add([790.0, 810.0])
    assert result[1] == pytest.approx(60.0, abs=1.7)


def test_rmssd_window_of_mostly_artefacts_publishes_nothing():
    window = RmssdWindow(window_s=5.0, min_intervals=3)
    beats = [1000.0, 1000.0, 1000.0] + [1000.0, 2500.0, 250.0, 2600.0] * 10
    assert window.add(beats) is None


def test_rmssd_window_with_too_few_clean_beats_yields_nothing():
    window = RmssdWindow(window_s=2.0, min_intervals=5)
    assert window.add([1000.0, 1000.0, 1000.0]) is None  # closed, but only 3 beats

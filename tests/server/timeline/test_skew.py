from __future__ import annotations

from pulsesync.server.timeline.skew import WINDOW_SAMPLES, WINDOW_US, SkewEstimator

S = 1_000_000


def test_estimate_is_the_minimum_sample_and_old_samples_expire() -> None:
    est = SkewEstimator()
    # True offset 5 s; delays 300 ms, 20 ms, 900 ms.
    assert est.observe(1, 100 * S, 95 * S - 300_000) == 5 * S + 300_000
    assert est.observe(1, 110 * S, 105 * S - 20_000) == 5 * S + 20_000
    assert est.observe(1, 120 * S, 115 * S - 900_000) == 5 * S + 20_000
    # The device clock was stepped: after the window passes, the new offset wins.
    later = 110 * S + WINDOW_US + S
    assert est.observe(1, later, later - 2 * S - 50_000) == 2 * S + 50_000
    assert est.estimate(1) == 2 * S + 50_000
    assert est.estimate(2) is None


def test_window_keeps_only_the_latest_samples() -> None:
    est = SkewEstimator()
    est.observe(1, 0, 0)  # a 0-offset sample, then many larger ones
    for i in range(1, WINDOW_SAMPLES + 1):
        value = est.observe(1, i * S, i * S - 7)
    assert value == 7

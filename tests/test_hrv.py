from __future__ import annotations

import math

import pytest

from pulsesync.hrv import pooled_rmssd_ms, rmssd_ms


def test_rmssd_of_one_series() -> None:
    assert rmssd_ms([800, 810, 790, 820]) == pytest.approx(math.sqrt((100 + 400 + 900) / 3))
    assert rmssd_ms([800]) is None
    assert rmssd_ms([800, 810]) == pytest.approx(10.0)
    assert rmssd_ms([800, 810], min_intervals=3) is None


def test_pooled_rmssd_never_differences_across_series() -> None:
    # Joined, the 810 -> 700 step would count; pooled, each series stands alone.
    assert pooled_rmssd_ms([[800, 810], [700, 690]]) == pytest.approx(10.0)
    assert pooled_rmssd_ms([[800], []]) is None

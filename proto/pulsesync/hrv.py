"""Heart-rate variability, one definition for the bridge, the timeline and the nudge features."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable


def pooled_rmssd_ms(series: Iterable[Iterable[float]]) -> float | None:
    """RMSSD (ms): the root mean square of successive RR-interval differences, pooled over
    series of consecutive intervals (never differencing across two series, which may have a
    gap between them). None when no series has two intervals."""
    total = 0.0
    n = 0
    for rr in series:
        for a, b in itertools.pairwise(rr):
            total += (b - a) ** 2
            n += 1
    return math.sqrt(total / n) if n else None


def rmssd_ms(rr_ms: Iterable[float], *, min_intervals: int = 2) -> float | None:
    """RMSSD (ms) of one series of consecutive RR intervals; None with fewer than
    `min_intervals` intervals (two is the least that has a difference)."""
    rr = list(rr_ms)
    if len(rr) < max(2, min_intervals):
        return None
    return pooled_rmssd_ms([rr])

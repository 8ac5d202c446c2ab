"""Values derived from consecutive measurements: CSC speed and cadence from cumulative
counters (with wrap-around), steps integrated from RSC cadence, and HRV RMSSD windows."""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from pulsesync.edge_agent.ble.parsers import CscMeasurement

EVENT_TIME_UNITS_PER_SECOND: Final = 1024  # CSC last-event times are in 1/1024 s.
WHEEL_REVOLUTIONS_MODULO: Final = 1 << 32  # uint32 cumulative wheel revolutions.
CRANK_REVOLUTIONS_MODULO: Final = 1 << 16  # uint16 cumulative crank revolutions.
EVENT_TIME_MODULO: Final = 1 << 16  # uint16 event times wrap every 64 s.
# A typical 700x25c road wheel; sensors do not send the circumference, so the user sets it.
DEFAULT_WHEEL_CIRCUMFERENCE_M: Final = 2.105


# The uint16 event times wrap every 64 s: two measurements further apart than this in host
# time cannot be told apart from ones a multiple of 64 s closer, so the pair is not used.
MAX_CSC_GAP_S: Final = EVENT_TIME_MODULO / EVENT_TIME_UNITS_PER_SECOND
# Beyond these a rate comes from a counter reset or a glitch, not from riding: 30 m/s is
# 108 km/h (a fast descent), 250 rpm is beyond any sprint cadence.
MAX_CSC_SPEED_M_PER_S: Final = 30.0
MAX_CSC_CADENCE_RPM: Final = 250.0


@dataclass(frozen=True, slots=True)
class CscRates:
    """Speed and crank cadence between two CSC measurements (None when not measurable).

    `rejected` counts rates computed but dropped as implausible (counter reset, glitch).
    """

    speed_m_per_s: float | None
    cadence_rpm: float | None
    rejected: int = 0


@dataclass(slots=True)
class CscCalculator:
    """Turns consecutive cumulative CSC counters into speed and cadence, across wrap-around."""

    wheel_circumference_m: float = DEFAULT_WHEEL_CIRCUMFERENCE_M
    _previous: CscMeasurement | None = None
    _previous_at_s: float | None = None

    def update(self, m: CscMeasurement, at_s: float | None = None) -> CscRates:
        """Rates since the previous measurement; the first one only primes the calculator.

        `at_s` is the host time of the notification (s); a pair further apart than the 16-bit
        event time can span (`MAX_CSC_GAP_S`) only primes again, since its deltas alias.
        """
        prev, self._previous = self._previous, m
        prev_at, self._previous_at_s = self._previous_at_s, at_s
        gap_ok = prev_at is None or at_s is None or 0.0 <= at_s - prev_at < MAX_CSC_GAP_S
        if not gap_ok:
            prev = None
        speed = cadence = None
        rejected = 0
        if prev is not None and prev.wheel and m.wheel:
            revs = (m.wheel.revolutions - prev.wheel.revolutions) % WHEEL_REVOLUTIONS_MODULO
            ticks = (m.wheel.last_event_time - prev.wheel.last_event_time) % EVENT_TIME_MODULO
            if ticks:
                speed = revs * self.wheel_circumference_m * EVENT_TIME_UNITS_PER_SECOND / ticks
            elif revs == 0:
                speed = None  # no new wheel event: the sensor repeats its last counters
            if speed is not None and not speed <= MAX_CSC_SPEED_M_PER_S:
                speed, rejected = None, rejected + 1
        if prev is not None and prev.crank and m.crank:
            revs = (m.crank.revolutions - prev.crank.revolutions) % CRANK_REVOLUTIONS_MODULO
            ticks = (m.crank.last_event_time - prev.crank.last_event_time) % EVENT_TIME_MODULO
            if ticks:
                cadence = revs * 60.0 * EVENT_TIME_UNITS_PER_SECOND / ticks
            if cadence is not None and not cadence <= MAX_CSC_CADENCE_RPM:
                cadence, rejected = None, rejected + 1
        return CscRates(speed, cadence, rejected)

    def reset(self) -> None:
        """Forget the previous measurement (after a reconnect its counters are stale)."""
        self._previous = None
        self._previous_at_s = None


# Cadence samples further apart than this are not integrated: the link was down or the
# sensor paused, and steps must not be invented across the gap (footpods notify at ~1-4 Hz).
MAX_CADENCE_GAP_S: Final = 5.0


@dataclass(slots=True)
class StepsFromCadence:
    """Integrates steps/min cadence over host time and yields whole steps per closed window."""

    window_s: float
    _window_start: float | None = None
    _last_time: float | None = None
    _last_cadence: float = 0.0
    _steps: float = 0.0

    def add(self, t: float, cadence_per_min: float) -> tuple[int, float] | None:
        """Feed a sample at host time t (s); returns (steps, window seconds) when a window closes."""
        if self._window_start is None or self._last_time is None:
            self._window_start = self._last_time = t
            self._last_cadence = cadence_per_min
            return None
        dt = t - self._last_time
        if 0 < dt <= MAX_CADENCE_GAP_S:
            self._steps += self._last_cadence / 60.0 * dt
        self._last_time = t
        self._last_cadence = cadence_per_min
        elapsed = t - self._window_start
        if elapsed < self.window_s:
            return None
        whole = math.floor(self._steps)
        self._steps -= whole  # carry the fraction so no step is lost between windows
        self._window_start = t
        return whole, elapsed

    def reset(self) -> None:
        """Forget the running sample after a disconnect (the carried fraction is kept)."""
        self._window_start = self._last_time = None


# RR intervals outside this range are artefacts (missed or extra beats), not physiology:
# 300 ms is 200 bpm, 2000 ms is 30 bpm.
MIN_RR_MS: Final = 300.0
MAX_RR_MS: Final = 2000.0
# Intervals differing from the local reference by more than this fraction are treated as
# ectopic/artefact, the usual 20 % filter of short-term HRV practice.
MAX_RR_JUMP: Final = 0.2
# The reference is the median of the last few in-range intervals, kept or not: one artefact
# cannot become the reference that rejects every clean beat after it (as a "last accepted
# beat" reference does), and the filter settles after a reconnect within a few beats.
REFERENCE_BEATS: Final = 5
# Beats needed in the reference before any is kept: the first beats of a session only seed it.
MIN_REFERENCE_BEATS: Final = 3
# A window where fewer than this share of the beats survived the filter says more about the
# contact than about the heart; no RMSSD is published from it.
MIN_KEPT_FRACTION: Final = 0.8


@dataclass(slots=True)
class RmssdWindow:
    """Collects RR intervals and yields RMSSD once the kept beats span `window_s` seconds.

    Only differences between two adjacent kept beats count (never across a dropped one), the
    window length is the sum of the kept beats, and a window with fewer than `min_intervals`
    kept beats (or mostly artefacts) publishes nothing.
    """

    window_s: float
    min_intervals: int = 10
    _recent: deque[float] = field(default_factory=lambda: deque(maxlen=REFERENCE_BEATS))
    _kept: list[float] = field(default_factory=list)
    _squared_diffs: list[float] = field(default_factory=list)
    _last_kept: float | None = None
    _seen: int = 0
    dropped: int = 0

    def add(self, rr_ms: Iterable[float]) -> tuple[float, float, int] | None:
        """Add intervals; returns (rmssd ms, window seconds, intervals used) when a window closes."""
        for value in rr_ms:
            in_range = MIN_RR_MS <= value <= MAX_RR_MS
            seeding = in_range and len(self._recent) < MIN_REFERENCE_BEATS
            if seeding:
                self._recent.append(value)  # seeds the reference; neither kept nor an artefact
                continue
            self._seen += 1
            keep = in_range
            if keep:
                reference = statistics.median(self._recent)
                keep = abs(value - reference) <= MAX_RR_JUMP * reference
            if in_range:
                self._recent.append(value)
            if not keep:
                self.dropped += 1
                self._last_kept = None  # the next kept beat is not successive to the last one
                continue
            if self._last_kept is not None:
                self._squared_diffs.append((value - self._last_kept) ** 2)
            self._last_kept = value
            self._kept.append(value)
        span_ms = math.fsum(self._kept)
        if span_ms < self.window_s * 1000.0:
            return None
        kept, diffs, seen = self._kept, self._squared_diffs, self._seen
        self._kept, self._squared_diffs, self._seen = [], [], 0
        if (
            len(kept) < self.min_intervals
            or len(diffs) < self.min_intervals - 1
            or len(kept) < MIN_KEPT_FRACTION * seen
        ):
            return None
        return math.sqrt(math.fsum(diffs) / len(diffs)), span_ms / 1000.0, len(kept)

    def reset(self) -> None:
        """Drop a partial window (after a disconnect the next beat is not successive)."""
        self._recent.clear()
        self._kept, self._squared_diffs, self._seen = [], [], 0
        self._last_kept = None

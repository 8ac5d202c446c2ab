"""Values derived from consecutive measurements: CSC speed and cadence from cumulative
counters (with wrap-around), steps integrated from RSC cadence, and HRV RMSSD windows."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from pulsesync.edge_agent.ble.parsers import CscMeasurement
from pulsesync.hrv import rmssd_ms

EVENT_TIME_UNITS_PER_SECOND: Final = 1024  # CSC last-event times are in 1/1024 s.
WHEEL_REVOLUTIONS_MODULO: Final = 1 << 32  # uint32 cumulative wheel revolutions.
CRANK_REVOLUTIONS_MODULO: Final = 1 << 16  # uint16 cumulative crank revolutions.
EVENT_TIME_MODULO: Final = 1 << 16  # uint16 event times wrap every 64 s.
# A typical 700x25c road wheel; sensors do not send the circumference, so the user sets it.
DEFAULT_WHEEL_CIRCUMFERENCE_M: Final = 2.105


@dataclass(frozen=True, slots=True)
class CscRates:
    """Speed and crank cadence between two CSC measurements (None when not measurable)."""

    speed_m_per_s: float | None
    cadence_rpm: float | None


@dataclass(slots=True)
class CscCalculator:
    """Turns consecutive cumulative CSC counters into speed and cadence, across wrap-around."""

    wheel_circumference_m: float = DEFAULT_WHEEL_CIRCUMFERENCE_M
    _previous: CscMeasurement | None = None

    def update(self, m: CscMeasurement) -> CscRates:
        """Rates since the previous measurement; the first one only primes the calculator."""
        prev, self._previous = self._previous, m
        speed = cadence = None
        if prev is not None and prev.wheel and m.wheel:
            revs = (m.wheel.revolutions - prev.wheel.revolutions) % WHEEL_REVOLUTIONS_MODULO
            ticks = (m.wheel.last_event_time - prev.wheel.last_event_time) % EVENT_TIME_MODULO
            if ticks:
                speed = revs * self.wheel_circumference_m * EVENT_TIME_UNITS_PER_SECOND / ticks
            elif revs == 0:
                speed = None  # no new wheel event: the sensor repeats its last counters
        if prev is not None and prev.crank and m.crank:
            revs = (m.crank.revolutions - prev.crank.revolutions) % CRANK_REVOLUTIONS_MODULO
            ticks = (m.crank.last_event_time - prev.crank.last_event_time) % EVENT_TIME_MODULO
            if ticks:
                cadence = revs * 60.0 * EVENT_TIME_UNITS_PER_SECOND / ticks
        return CscRates(speed, cadence)


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
# Successive intervals differing by more than this fraction are treated as ectopic/artefact,
# the usual 20 % filter of short-term HRV practice.
MAX_RR_JUMP: Final = 0.2


@dataclass(slots=True)
class RmssdWindow:
    """Collects RR intervals and yields RMSSD once every `window_s` seconds of beats."""

    window_s: float
    min_intervals: int = 10
    _rr: list[float] = field(default_factory=list)
    _span_ms: float = 0.0

    def add(self, rr_ms: Iterable[float]) -> tuple[float, float, int] | None:
        """Add intervals; returns (rmssd ms, window seconds, intervals used) when a window closes."""
        for value in rr_ms:
            self._span_ms += value
            if not MIN_RR_MS <= value <= MAX_RR_MS:
                continue
            if self._rr and abs(value - self._rr[-1]) > MAX_RR_JUMP * self._rr[-1]:
                continue
            self._rr.append(value)
        if self._span_ms < self.window_s * 1000.0:
            return None
        rr, span = self._rr, self._span_ms
        self._rr, self._span_ms = [], 0.0
        if len(rr) < self.min_intervals:
            return None
        rmssd = rmssd_ms(rr)
        return None if rmssd is None else (rmssd, span / 1000.0, len(rr))

    def reset(self) -> None:
        """Drop a partial window (after a disconnect the next beat is not successive)."""
        self._rr, self._span_ms = [], 0.0

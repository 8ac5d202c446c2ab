"""Time, injected: production uses the system clock, tests a clock they can move."""

from __future__ import annotations

from pulsesync.timeutil import US_PER_S
from pulsesync.timeutil import Clock as Clock
from pulsesync.timeutil import SystemClock as SystemClock


class FakeClock:
    """A clock that only moves when told to; for tests and accelerated simulations."""

    def __init__(self, start_us: int = 1_767_225_600_000_000) -> None:  # 2026-01-01T00:00Z
        self._now = start_us

    def now_us(self) -> int:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += int(seconds * US_PER_S)

    def set_us(self, now_us: int) -> None:
        self._now = now_us

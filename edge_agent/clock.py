"""Time on a device, injected: the host clock, or an accelerated clock for simulations."""

from __future__ import annotations

import asyncio
import time
from typing import Final

from pulsesync.timeutil import Clock as Clock
from pulsesync.timeutil import SystemClock as SystemClock

# A sleep shorter than this is not worth a trip through the event loop's timer heap.
_MIN_SLEEP_S: Final = 0.0005


class ScaledClock:
    """A clock that runs `speed` times faster than the host clock from `start_us`, but never
    ahead of the host clock: once it catches up it runs at real speed.

    Simulated sources stamp their events with it, so an accelerated run produces a realistic
    past: device times are never in the future, which a server would rightly refuse.
    """

    def __init__(self, speed: float = 1.0, start_us: int | None = None) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        self.speed = speed
        self._real0_ns = time.monotonic_ns()
        self._wall0_us = time.time_ns() // 1000
        self._start_us = self._wall0_us if start_us is None else start_us

    def _elapsed_us(self) -> float:
        return (time.monotonic_ns() - self._real0_ns) / 1000

    def now_us(self) -> int:
        """Simulated microseconds since the epoch, never past the host clock."""
        elapsed = self._elapsed_us()
        return int(min(self._start_us + self.speed * elapsed, self._wall0_us + elapsed))

    async def sleep_until(self, target_us: int) -> None:
        """Sleep (in real time) until this clock reads at least target_us."""
        for _ in range(1000):  # piecewise-linear clock: two or three rounds in practice
            remaining_us = target_us - self.now_us()
            if remaining_us <= 0:
                return
            accelerated = self._start_us + self.speed * self._elapsed_us() < (
                self._wall0_us + self._elapsed_us()
            )
            rate = self.speed if accelerated else 1.0
            delay = remaining_us / rate / 1e6
            await asyncio.sleep(delay if delay >= _MIN_SLEEP_S else 0)

    async def sleep(self, seconds: float) -> None:
        """Sleep for `seconds` of this clock's time."""
        await self.sleep_until(self.now_us() + int(seconds * 1e6))

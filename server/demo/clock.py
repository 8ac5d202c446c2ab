"""The demo's paced clock: accelerated time that stands still while the world lags behind it."""

from __future__ import annotations

import asyncio
import time
from typing import Final

from pulsesync.edge_agent.clock import ScaledClock

# How often the pacer looks at the event loop, and the lateness it forgives (a timer is never
# exactly on time). See PacedClock and `DemoWorld._pace`.
PACE_TICK_S: Final = 0.01
PACE_SLACK_S: Final = 0.002
_MIN_WAIT_S: Final = 0.001  # a sleeper waiting out a hold wakes at most this often


class PacedClock(ScaledClock):
    """The demo's accelerated clock, held still while the world lags behind it.

    The whole world (server, agents, sensors) shares one event loop. At a thousandfold speed a
    loop that falls 50 ms behind, because the machine is busy, lets 50 simulated seconds pass
    unlived: sensors miss their ticks, batches arrive minutes of simulated time after they
    were sent (and look skewed into the future), calls meet their deadlines with work queued.
    So the demo holds this clock for as long as the loop was late (see `DemoWorld._pace`): the
    simulated period then passes only as fast as the machine can live it, and a busy machine
    gives the same run, only longer. (The wearable's readings are stamped with their sensor
    tick's moment besides, see `Day._wearable`.)
    """

    def __init__(self, speed: float, start_us: int) -> None:
        super().__init__(speed, start_us)
        self._held_ns = 0  # the length of holds that have ended
        self._hold_from_ns = 0  # the current (or last) hold
        self._hold_until_ns = 0

    def hold(self, seconds: float) -> None:
        """Stop the clock for `seconds` of real time from now (added to a hold in progress)."""
        now = time.monotonic_ns()
        if now < self._hold_until_ns:
            self._hold_until_ns += int(seconds * 1e9)
            return
        self._held_ns += self._hold_until_ns - self._hold_from_ns
        self._hold_from_ns, self._hold_until_ns = now, now + int(seconds * 1e9)

    def _elapsed_us(self) -> float:
        """Real time since the start, less the holds: the clock never goes back."""
        now = time.monotonic_ns()
        holding = min(max(now - self._hold_from_ns, 0), self._hold_until_ns - self._hold_from_ns)
        return (now - self._real0_ns - self._held_ns - holding) / 1000

    async def sleep_until(self, target_us: int) -> None:
        """Sleep until the clock reads target_us, however long it is held meanwhile."""
        while (remaining_us := target_us - self.now_us()) > 0:  # noqa: ASYNC110 - a clock, no event
            await asyncio.sleep(max(remaining_us / self.speed / 1e6, _MIN_WAIT_S))

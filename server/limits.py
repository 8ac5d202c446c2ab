"""Per-device limits on heavy reads, so that one device cannot starve another person.

Every read goes through the one reader connection of the database, a queue served in order:
twelve concurrent 1000-row pages from one device put everyone else's small read behind them.
A device may have `HEAVY_READS_PER_DEVICE` heavy reads in flight; one more is refused at once
with RESOURCE_EXHAUSTED / TOO_MANY_CONCURRENT_READS and a short retry delay.

Heavy reads are the calls whose cost grows with the person's data: TimelineService.ListEvents
and SummarizeActivity, NudgeService.ListNudges, PrivacyService.GetPrivacySummary and
ExportData (held for the whole stream).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from pulsesync.server.errors import ResourceExhausted

# Two: a client can have the next page in flight while it handles one (no client needs
# more to read as fast as the database answers), and a flood from one device then takes at
# most two places in the reader's queue.
HEAVY_READS_PER_DEVICE: Final = 2
# A heavy read takes milliseconds to a few hundred; a quarter second lets one finish.
HEAVY_READ_RETRY_S: Final = 0.25


class HeavyReads:
    """Counts the heavy reads each device has in flight."""

    def __init__(self, per_device: int = HEAVY_READS_PER_DEVICE) -> None:
        self.per_device = per_device
        self._in_flight: dict[int, int] = {}

    @contextmanager
    def slot(self, device_pk: int) -> Iterator[None]:
        """Hold one of the device's slots while inside; ResourceExhausted if none is free."""
        n = self._in_flight.get(device_pk, 0)
        if n >= self.per_device:
            raise ResourceExhausted(
                f"this device already has {n} heavy reads in flight (list, summary, export); "
                "wait for one to finish before starting another",
                reason="TOO_MANY_CONCURRENT_READS",
                retry_delay_s=HEAVY_READ_RETRY_S,
            )
        self._in_flight[device_pk] = n + 1
        try:
            yield
        finally:
            left = self._in_flight[device_pk] - 1
            if left:
                self._in_flight[device_pk] = left
            else:
                del self._in_flight[device_pk]

    def in_flight(self, device_pk: int) -> int:
        return self._in_flight.get(device_pk, 0)

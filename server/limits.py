"""Per-device limits on heavy reads, so that one device cannot starve another person.

Heavy reads are the calls whose cost grows with the person's data: TimelineService.ListEvents
and SummarizeActivity, NudgeService.ListNudges, PrivacyService.GetPrivacySummary and
ExportData (held for the whole stream). Two limits apply to each device:

* concurrency: `HEAVY_READS_PER_DEVICE` in flight; one more is refused at once with
  RESOURCE_EXHAUSTED / TOO_MANY_CONCURRENT_READS and a short retry delay. Every read goes
  through the one reader connection of the database, a queue served in order: twelve
  concurrent 1000-row pages from one device would put everyone else's small read behind them.
* rate: a budget of rows (a token bucket on the server's injected clock), `ROWS_PER_S`
  sustained and `BURST_ROWS` at once. A read is charged the rows it may return (its page size,
  or a full page when it has none) before it runs. A read the budget lacks a little for waits
  until it is there (at most `MAX_WAIT_S`); one it lacks more for is held `MAX_WAIT_S`, then
  refused with RESOURCE_EXHAUSTED / READ_RATE_LIMITED and a RetryInfo saying when the budget
  holds it. Holding the refusal is what paces a client that retries at once: each of its calls
  costs it half a second and the server one timer, not a round trip answered at full speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

from pulsesync.server.errors import ResourceExhausted

# Two: a client can have the next page in flight while it handles one (no client needs
# more to read as fast as the database answers), and a flood from one device then takes at
# most two places in the reader's queue.
HEAVY_READS_PER_DEVICE: Final = 2
# A heavy read takes milliseconds to a few hundred; a quarter second lets one finish.
HEAVY_READ_RETRY_S: Final = 0.25
# Five 1000-event pages a second: an app pages through a year of a person's events (~1M)
# in minutes, ExportData is there for more, and what one device can make the server parse and
# build stays a few percent of its event loop (docs/benchmarks.md, Fairness).
ROWS_PER_S: Final = 5_000
# Twenty full pages at once: opening an app and scrolling never meets the limit.
BURST_ROWS: Final = 20_000
# What a read without a page size (a summary, an export) is charged: a full page.
FULL_PAGE_ROWS: Final = 1_000
# The longest a read waits for its budget, and the time a refused read is held before its
# answer: short enough for a person looking at a screen, long enough to pace a flood.
MAX_WAIT_S: Final = 0.5


def read_cost(request: Any) -> int:
    """The rows a heavy read is charged: its page size (capped at a full page), or a full
    page for a read without one."""
    size = getattr(request, "page_size", 0)
    return min(int(size), FULL_PAGE_ROWS) if isinstance(size, int) and size > 0 else FULL_PAGE_ROWS


class ReadRateLimited(ResourceExhausted):
    """The device's row budget lacks more than MAX_WAIT_S of refill for this read."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(
            "this device reads faster than the server allows (list, summary, export: "
            f"{ROWS_PER_S} rows a second); wait for the RetryInfo delay, then retry",
            reason="READ_RATE_LIMITED",
            retry_delay_s=wait_s,
        )
        self.wait_s = wait_s


class HeavyReads:
    """Counts the heavy reads each device has in flight and keeps its row budget."""

    def __init__(
        self,
        per_device: int = HEAVY_READS_PER_DEVICE,
        *,
        rows_per_s: float = ROWS_PER_S,
        burst_rows: float = BURST_ROWS,
    ) -> None:
        self.per_device = per_device
        self.rows_per_s = rows_per_s
        self.burst_rows = burst_rows
        self._in_flight: dict[int, int] = {}
        # device -> (rows in its budget, as of when, in the clock's microseconds); the rows go
        # below zero for reads that wait for budget already promised to them.
        self._budget: dict[int, tuple[float, int]] = {}

    def reserve(self, device_pk: int, rows: int, now_us: int) -> float:
        """Charge rows to the device's budget; the seconds the read must wait first (0 when the
        budget holds them). ReadRateLimited, charging nothing, if the wait exceeds MAX_WAIT_S."""
        have, at_us = self._budget.get(device_pk, (self.burst_rows, now_us))
        have = min(self.burst_rows, have + max(0, now_us - at_us) * self.rows_per_s / 1e6)
        left = have - rows
        wait_s = -left / self.rows_per_s if left < 0 else 0.0
        if wait_s > MAX_WAIT_S:
            self._budget[device_pk] = (have, now_us)
            raise ReadRateLimited(wait_s - MAX_WAIT_S)  # the caller holds it MAX_WAIT_S first
        self._budget[device_pk] = (left, now_us)
        return wait_s

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

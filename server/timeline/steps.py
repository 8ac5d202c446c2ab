"""Steps: the one rule for how many steps a person took, used by every reader.

TimelineService.SummarizeActivity (and the demo report built on it), the nudge features
(steps in the last 30/60/120 minutes, sedentary time) and the steps outcome of a nudge all
count with this rule, so they agree on one person's steps:

* A Steps event's count belongs to the UTC minute that ends at or after its time:
  minute index (t - 1) // 60 s. A sensor reports the steps it counted up to t.
* Within a minute, each device's counts are summed; the minute then takes the largest
  device's sum. A phone in the pocket and a watch count the same walk: adding them would
  count it twice.
* A time range [start, end) holds the minutes that start in it, with start and end rounded
  down to whole minutes. Buckets of a minute or wider therefore share no minute, and the
  buckets of a range add up to the range.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING

from pulsesync.timeutil import US_PER_MIN
from pulsesync.v1 import events_pb2

if TYPE_CHECKING:
    from pulsesync.server.timeline.store import TimelineStore


def step_minute(t_us: int) -> int:
    """The minute (index since the epoch) a step count reported at t_us belongs to."""
    return (t_us - 1) // US_PER_MIN


def minute_span(start_us: int, end_us: int) -> tuple[int, int]:
    """The minutes [first, end) that the time range [start_us, end_us) holds."""
    return start_us // US_PER_MIN, end_us // US_PER_MIN


def event_span(start_us: int, end_us: int) -> tuple[int, int]:
    """The event times [lo, hi) whose counts fall in the minutes of [start_us, end_us)."""
    first, end = minute_span(start_us, end_us)
    return first * US_PER_MIN + 1, end * US_PER_MIN + 1


class StepMinutes:
    """Step counts per minute and device; each minute worth its largest device's sum."""

    __slots__ = ("_devices",)

    def __init__(self) -> None:
        self._devices: dict[int, dict[Hashable, int]] = {}

    def add(self, device: Hashable, t_us: int, count: int) -> int:
        """Count steps a device reported at t_us; the minute's total after it."""
        return self.add_minute(device, step_minute(t_us), count)

    def add_minute(self, device: Hashable, minute: int, count: int) -> int:
        """Count steps a device took in a minute; the minute's total after it."""
        devices = self._devices.setdefault(minute, {})
        devices[device] = devices.get(device, 0) + count
        return max(devices.values())

    def minute_totals(self) -> dict[int, int]:
        """minute -> steps, for every minute with a count."""
        return {m: max(d.values()) for m, d in self._devices.items()}

    def total(self, start_us: int, end_us: int) -> int:
        """Steps in the minutes of [start_us, end_us)."""
        first, end = minute_span(start_us, end_us)
        return sum(max(d.values()) for m, d in self._devices.items() if first <= m < end)

    def per_bucket(self, start_us: int, end_us: int, bucket_us: int) -> list[int]:
        """Steps in each bucket [start + i*bucket, ...) of [start_us, end_us) (bucket >= 1 min)."""
        n = max(0, -(-(end_us - start_us) // bucket_us))
        # Bucket i holds minutes [bounds[i], bounds[i + 1]).
        bounds = [min(start_us + i * bucket_us, end_us) // US_PER_MIN for i in range(n + 1)]
        out = [0] * n
        for m, total in self.minute_totals().items():
            if not bounds[0] <= m < bounds[-1]:
                continue
            i = max(0, min(n - 1, (m * US_PER_MIN - start_us) // bucket_us))
            while bounds[i] > m:
                i -= 1
            while bounds[i + 1] <= m:
                i += 1
            out[i] += total
        return out


def total_steps(counts: Iterable[tuple[Hashable, int, int]], start_us: int, end_us: int) -> int:
    """Steps in [start_us, end_us) from (device, event time, count) triples."""
    minutes = StepMinutes()
    for device, t_us, count in counts:
        minutes.add(device, t_us, count)
    return minutes.total(start_us, end_us)


async def steps_in_window(
    timeline: TimelineStore, user_id: int, start_us: int, window_us: int
) -> int:
    """The user's steps in [start_us, start_us + window_us), read from the timeline."""
    end_us = start_us + window_us
    lo, hi = event_span(start_us, end_us)
    events = await timeline.events(user_id, lo, hi, kinds={events_pb2.EVENT_KIND_STEPS})
    return total_steps(
        ((e.device_id, e.t_us, e.event.steps.count) for e in events), start_us, end_us
    )

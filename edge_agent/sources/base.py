"""What an event source is: something that records events into a Tracker until it is done."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pulsesync.argtypes import non_negative
from pulsesync.edge_agent.clock import ScaledClock
from pulsesync.edge_agent.tracker import Tracker


class SimClock(Protocol):
    """A device clock a source can also wait on (accelerated or instant in simulations)."""

    def now_us(self) -> int: ...

    async def sleep_until(self, target_us: int) -> None: ...


class InstantClock:
    """Simulated time that jumps to whatever is awaited: a simulation runs as fast as it can,
    with the same device times as at any speed."""

    def __init__(self, start_us: int | None = None) -> None:
        self._now = time.time_ns() // 1000 if start_us is None else start_us

    def now_us(self) -> int:
        """The simulated time."""
        return self._now

    async def sleep_until(self, target_us: int) -> None:
        """Jump forward to target_us, letting other tasks run."""
        self._now = max(self._now, target_us)
        await asyncio.sleep(0)


@dataclass(frozen=True, slots=True)
class SourceOptions:
    """How to run a source: seed for determinism, clock for (accelerated) time, duration in
    simulated seconds (None: until cancelled), and source-specific extras (key=value flags)."""

    seed: int = 0
    clock: SimClock = field(default_factory=ScaledClock)
    duration_s: float | None = None
    extra: Mapping[str, str] = field(default_factory=dict)


def check_extra(options: SourceOptions, source: str, known: Collection[str] = ()) -> None:
    """Refuse a source option the source does not read (a typo would otherwise be ignored)."""
    unknown = sorted(set(options.extra) - set(known))
    if unknown:
        takes = ", ".join(sorted(known)) if known else "none"
        raise ValueError(
            f"{source} has no source option {', '.join(repr(k) for k in unknown)} (it takes: {takes})"
        )


def extra_number(options: SourceOptions, key: str, default: float) -> float:
    """A finite number >= 0 from the source options (ValueError naming the option)."""
    text = options.extra.get(key)
    if text is None:
        return default
    try:
        return non_negative(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"source option {key}={e}") from None


class EventSource(Protocol):
    """Records events into a tracker until done (duration reached) or cancelled."""

    async def run(self, tracker: Tracker) -> None: ...


SourceFactory = Callable[[SourceOptions], EventSource]

"""Time, shared by the server and the agent: the injected `Clock`, unit constants, Timestamps.

Times are integer microseconds since the Unix epoch everywhere inside PulseSync (exact, cheap to
compare, what SQLite stores); `google.protobuf.Timestamp` only at the API.
"""

from __future__ import annotations

import time
from typing import Final, Protocol

from google.protobuf import timestamp_pb2

US_PER_MS: Final = 1_000
US_PER_S: Final = 1_000_000
US_PER_MIN: Final = 60 * US_PER_S
US_PER_HOUR: Final = 60 * US_PER_MIN
US_PER_DAY: Final = 24 * US_PER_HOUR


class Clock(Protocol):
    """Wall-clock time in integer microseconds since the Unix epoch."""

    def now_us(self) -> int: ...


class SystemClock:
    """The host's wall clock."""

    def now_us(self) -> int:
        """Microseconds since the epoch, now."""
        return time.time_ns() // 1000


def timestamp(us: int) -> timestamp_pb2.Timestamp:
    """A Timestamp for microseconds since the epoch."""
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(us)
    return ts


def optional_timestamp(us: int | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp, or None for no time."""
    return None if us is None else timestamp(us)


def timestamp_us(ts: timestamp_pb2.Timestamp) -> int:
    """Microseconds since the epoch of a Timestamp (its nanoseconds truncated), read directly."""
    return ts.seconds * US_PER_S + ts.nanos // US_PER_MS

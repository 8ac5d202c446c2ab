"""The shared time helpers: one definition of Clock and the Timestamp conversion for both sides."""

from __future__ import annotations

import pulsesync.edge_agent.clock as agent_clock
import pulsesync.server.clock as server_clock
from pulsesync.timeutil import (
    US_PER_DAY,
    US_PER_MIN,
    SystemClock,
    optional_timestamp,
    timestamp,
    timestamp_us,
)


def test_timestamp_round_trips_microseconds() -> None:
    us = 1_767_225_600_123_456
    assert timestamp(us).ToMicroseconds() == us
    assert optional_timestamp(None) is None
    assert optional_timestamp(us) == timestamp(us)
    assert US_PER_DAY == 24 * 60 * US_PER_MIN == 86_400_000_000


def test_server_and_agent_share_one_clock() -> None:
    assert server_clock.SystemClock is agent_clock.SystemClock is SystemClock
    assert server_clock.Clock is agent_clock.Clock


def test_timestamp_us_reads_what_timestamp_wrote() -> None:
    for us in (0, 1, 999_999, 1_767_225_600_123_456, -1):
        assert timestamp_us(timestamp(us)) == us

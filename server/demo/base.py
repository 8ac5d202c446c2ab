"""The shared part of the demo world: its state, the log of happenings and the paged reads
that both the day and the collection at its end make.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import grpc
from google.protobuf import timestamp_pb2

from pulsesync.server.demo.clock import PacedClock
from pulsesync.server.demo.model import (
    DemoOptions,
    Happening,
    PersonRun,
    Say,
)
from pulsesync.timeutil import US_PER_HOUR, timestamp
from pulsesync.v1 import (
    nudges_pb2,
    nudges_pb2_grpc,
)


class WorldBase:
    """The state every part of the demo world shares: the options, the simulated clock and
    period, the people, the server's address, and the log of happenings."""

    options: DemoOptions
    start_us: int
    end_us: int
    clock: PacedClock
    rng: random.Random
    happenings: list[Happening]
    people: list[PersonRun]
    address: str
    progress: Callable[[int], None]
    _say: Say | None

    def note(self, person: PersonRun, what: str, text: str) -> None:
        h = Happening(self.clock.now_us(), person.name, what, text)
        self.happenings.append(h)
        if self._say is not None:
            self._say(h.t_us, f"{person.name} · {what}", text)

    def _history_range(self) -> tuple[timestamp_pb2.Timestamp, timestamp_pb2.Timestamp]:
        """The simulated period with an hour on each side (late uploads, outcome windows)."""
        hour = US_PER_HOUR
        return timestamp(self.start_us - hour), timestamp(self.end_us + hour)

    async def _nudge_history(
        self, channel: grpc.aio.Channel, md: tuple[tuple[str, str], ...]
    ) -> list[nudges_pb2.NudgeRecord]:
        """The person's nudges with feedback and outcomes (ListNudges, every page)."""
        nudges = nudges_pb2_grpc.NudgeServiceStub(channel)
        start, end = self._history_range()

        async def page(token: str) -> tuple[list[nudges_pb2.NudgeRecord], str]:
            resp = await nudges.ListNudges(
                nudges_pb2.ListNudgesRequest(
                    start_time=start, end_time=end, page_size=200, page_token=token
                ),
                metadata=md,
                timeout=30,
            )
            return list(resp.nudges), resp.next_page_token

        return await all_pages(page)


T = TypeVar("T")
# A person's day is a few tens of thousands of events: 1000 pages of 1000 is far beyond it,
# and bounds the loop should a server keep returning a next page.
MAX_PAGES: Final = 1000


async def all_pages(fetch: Callable[[str], Awaitable[tuple[list[T], str]]]) -> list[T]:
    """Every item of a paginated list RPC (fetch(token) -> (items, next_page_token))."""
    items: list[T] = []
    token = ""
    for _ in range(MAX_PAGES):
        page, token = await fetch(token)
        items.extend(page)
        if not token:
            return items
    raise RuntimeError(f"more than {MAX_PAGES} pages: the server keeps returning a next page")

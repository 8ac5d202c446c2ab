"""The nudge features of the people this replica decides for, fed from committed events
whichever replica ingested them (on PostgreSQL, where several replicas ingest).

Before each tick, the people of the shards held are read with their change-feed heads; the
changes after each person's cursor are read and handed to the feature feed as if published on
the bus. A person met for the first time (or again, after their shard changed hands) starts
from a warm-up window of recent events up to the head read first, so nothing is folded twice.
One query per tick finds who changed; reads follow only for those people. (Taking shards over
costs one read per person of those shards; for many millions of people a change feed indexed
by commit time would let it read only the people active in the window.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol

from pulsesync.server.bus import CommittedEvent
from pulsesync.server.clock import Clock
from pulsesync.server.cluster import Shards, shard_of

# How far back a person taken over is read: longer than the longest sedentary stretch the
# policy counts (240 minutes) and a day's scheduled decision points.
WARMUP_US: Final = 24 * 3600 * 1_000_000


class EventFeedStorage(Protocol):
    async def heads(self, shards: Sequence[int], of: int) -> dict[int, int]: ...

    async def changes_after(self, user_id: int, after: int, upto: int) -> list[CommittedEvent]: ...

    async def recent(self, user_id: int, since_t_us: int, upto: int) -> list[CommittedEvent]: ...


class EventSink(Protocol):
    """The feature feed (`pulsesync.server.nudges.feed.FeatureFeed`)."""

    def on_events(self, user_id: int, events: Sequence[CommittedEvent]) -> None: ...

    def forget_user(self, user_id: int) -> None: ...


class ShardFeed:
    """Pulls committed events of the held shards' people into the feature feed."""

    def __init__(
        self, storage: EventFeedStorage, shards: Shards, feed: EventSink, clock: Clock
    ) -> None:
        self._storage = storage
        self._shards = shards
        self._feed = feed
        self._clock = clock
        self._cursor: dict[int, int] = {}  # user_id -> last change folded
        self._epochs: dict[int, int] = {}  # shard -> epoch the cursors above were read under

    async def pull(self) -> int:
        """Hand the events committed since the last pull to the feed; returns how many."""
        held = await self._shards.held()
        n = self._shards.shards
        moved = {s for s, e in self._epochs.items() if held.get(s) != e}
        if moved:
            # Lost, or changed hands and back: what we folded is stale; start over.
            for user_id in [u for u in self._cursor if shard_of(u, n) in moved]:
                del self._cursor[user_id]
                self._feed.forget_user(user_id)
        self._epochs = dict(held)
        if not held:
            return 0
        count = 0
        for user_id, head in (await self._storage.heads(sorted(held), n)).items():
            cursor = self._cursor.get(user_id)
            if cursor is None:
                since = self._clock.now_us() - WARMUP_US
                events = await self._storage.recent(user_id, since, head)
            elif head > cursor:
                events = await self._storage.changes_after(user_id, cursor, head)
            else:
                continue
            self._cursor[user_id] = head
            if events:
                self._feed.on_events(user_id, events)
                count += len(events)
        return count

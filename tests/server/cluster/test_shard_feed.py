"""The nudge features' feed from the change feed on PostgreSQL: events whichever replica
ingested them, each folded once, and started over when a shard changes hands."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from pulsesync.server.bus import CommittedEvent
from pulsesync.server.clock import FakeClock
from pulsesync.server.cluster import shard_of
from pulsesync.server.nudges.shard_feed import ShardFeed
from pulsesync.server.storage.postgres.events import PostgresEventWriter
from pulsesync.server.storage.postgres.feed import PostgresEventFeed
from pulsesync.server.storage.postgres.pool import PostgresPool
from tests.server.storage.postgres.test_events import NOW_US, add_device, batch, event_row

SHARDS = 8


class Held:
    """Shards held, set by the test (the lease mechanics are tested in test_shards.py)."""

    shards = SHARDS

    def __init__(self) -> None:
        self.now: dict[int, int] = {}

    async def held(self) -> dict[int, int]:
        return dict(self.now)

    def on_taken(self, callback: Callable[[frozenset[int]], None]) -> Callable[[], None]:
        return lambda: None  # the feed reads held() at every pull


class Sink:
    def __init__(self) -> None:
        self.seqs: dict[int, list[int]] = {}
        self.forgotten: list[int] = []

    def on_events(self, user_id: int, events: Sequence[CommittedEvent]) -> None:
        self.seqs.setdefault(user_id, []).extend(e.seq for e in events)

    def forget_user(self, user_id: int) -> None:
        self.forgotten.append(user_id)
        self.seqs.pop(user_id, None)


@pytest.fixture
async def writers(
    migrated_pool: PostgresPool, postgres_dsn: str
) -> AsyncIterator[tuple[PostgresEventWriter, PostgresEventWriter]]:
    other = await PostgresPool.open(postgres_dsn, max_size=2)
    a, b = PostgresEventWriter(migrated_pool), PostgresEventWriter(other)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()
        await other.close()


async def commit(writer: PostgresEventWriter, user: int, dev: int, seqs: range) -> None:
    await writer.submit(batch([event_row(user, dev, s) for s in seqs]))


async def test_events_from_every_replica_are_folded_once_and_start_over_on_takeover(
    migrated_pool: PostgresPool, writers: tuple[PostgresEventWriter, PostgresEventWriter]
) -> None:
    a, b = writers
    ada, ada_phone = await add_device(migrated_pool, "ada")
    bob, bob_phone = await add_device(migrated_pool, "bob")
    while shard_of(bob, SHARDS) == shard_of(ada, SHARDS):  # bob in a shard not held
        bob, bob_phone = await add_device(migrated_pool, f"bob{bob}")
    clock = FakeClock(NOW_US + 60_000_000)
    storage = PostgresEventFeed(migrated_pool)
    x_shards, x = Held(), Sink()
    x_feed = ShardFeed(storage, x_shards, x, clock)
    x_shards.now = {shard_of(ada, SHARDS): 1}

    await commit(a, ada, ada_phone, range(1, 11))  # ingested on one replica
    await commit(b, ada, ada_phone, range(11, 21))  # and on another
    await commit(b, bob, bob_phone, range(1, 6))
    assert await x_feed.pull() == 20
    assert x.seqs == {ada: list(range(1, 21))}
    await commit(b, ada, ada_phone, range(21, 31))
    assert await x_feed.pull() == 10
    assert await x_feed.pull() == 0
    assert x.seqs == {ada: list(range(1, 31))}

    # Another replica takes ada's shard over (a new epoch): it starts from recent events,
    # and the replica that lost it forgets what it folded.
    y_shards, y = Held(), Sink()
    y_feed = ShardFeed(storage, y_shards, y, clock)
    y_shards.now = {shard_of(ada, SHARDS): 2}
    x_shards.now = {}
    assert await y_feed.pull() == 30
    assert await x_feed.pull() == 0
    assert x.forgotten == [ada]
    assert y.seqs == {ada: list(range(1, 31))}

"""Signals between replicas over a real PostgreSQL: others hear a ring, the sender does not;
a ring in a transaction arrives with its commit; a reconnect says "read again"."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from pulsesync.server.cluster import (
    CONSENT_CHANGED,
    PROFILE_CHANGED,
    LocalCluster,
    LocalHub,
)
from pulsesync.server.postgres_cluster import PostgresCluster
from pulsesync.server.storage.postgres.pool import PostgresPool
from tests.support.postgres import until

WITHIN_S = 30.0


class Heard(list[int | None]):
    def __call__(self, key: int | None) -> None:
        self.append(key)

    def has(self, key: int | None) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return key in self

        return check


@pytest.fixture
async def pair(
    migrated_pool: PostgresPool, postgres_dsn: str
) -> AsyncIterator[tuple[PostgresCluster, PostgresCluster]]:
    other = await PostgresPool.open(postgres_dsn, max_size=2)
    a = PostgresCluster(migrated_pool, postgres_dsn, replica="a", keepalive_s=0.2)
    b = PostgresCluster(other, postgres_dsn, replica="b", keepalive_s=0.2)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()
        await other.close()


async def test_other_replicas_hear_a_ring_and_the_sender_does_not(
    pair: tuple[PostgresCluster, PostgresCluster], migrated_pool: PostgresPool
) -> None:
    a, b = pair
    on_a, on_b = Heard(), Heard()
    await a.signals.subscribe(PROFILE_CHANGED, on_a)
    await b.signals.subscribe(PROFILE_CHANGED, on_b)
    async with migrated_pool.transaction() as tx:
        await a.signals.ring(PROFILE_CHANGED, 7, conn=tx)
        await a.signals.ring(PROFILE_CHANGED, 8)  # at once, in its own transaction
        await until(on_b.has(8), WITHIN_S)
        assert 7 not in on_b  # not before its transaction commits
    await until(on_b.has(7), WITHIN_S)
    await b.signals.ring(PROFILE_CHANGED, 9)
    await until(on_a.has(9), WITHIN_S)
    assert on_a == [9]
    assert on_b == [8, 7]


async def test_after_a_reconnect_every_subscriber_reads_again(
    pair: tuple[PostgresCluster, PostgresCluster], migrated_pool: PostgresPool
) -> None:
    _, b = pair
    heard = Heard()
    await b.signals.subscribe(CONSENT_CHANGED, heard)
    pid = b.doorbell.backend_pid
    await migrated_pool.fetchval("SELECT pg_terminate_backend($1)", pid)
    await until(heard.has(None), WITHIN_S)


async def test_an_unknown_topic_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown cluster topic"):
        await LocalCluster().signals.ring("profile", 1)


async def test_local_signals_reach_the_other_members_of_a_hub_only() -> None:
    hub = LocalHub()
    a, b = LocalCluster(hub), LocalCluster(hub)
    alone = LocalCluster()
    on_a, on_b, on_alone = Heard(), Heard(), Heard()
    await a.signals.subscribe(PROFILE_CHANGED, on_a)
    await b.signals.subscribe(PROFILE_CHANGED, on_b)
    await alone.signals.subscribe(PROFILE_CHANGED, on_alone)
    await a.signals.ring(PROFILE_CHANGED, 3)
    assert (on_a, on_b, on_alone) == ([], [3], [])

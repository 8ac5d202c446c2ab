"""Shard leases: one holder per shard, a fair share each, a dead replica's shards taken over."""

from __future__ import annotations

import asyncio

from pulsesync.server.cluster import shard_of
from pulsesync.server.storage.postgres.leases import LeaseGroup
from pulsesync.server.storage.postgres.pool import PostgresPool
from tests.support.postgres import until

TTL_S = 6.0


class FakeClock:
    def __init__(self) -> None:
        self.us = 1_000_000_000_000

    async def __call__(self) -> int:
        return self.us

    def advance(self, seconds: float) -> None:
        self.us += int(seconds * 1e6)


async def owners(pool: PostgresPool, now_us: int) -> dict[int, str]:
    rows = await pool.fetch(
        "SELECT shard, holder FROM leases WHERE grp = 'nudges' AND expire_us > $1", now_us
    )
    return {int(r["shard"]): r["holder"] for r in rows}


async def test_fair_share_and_takeover_after_a_holder_dies(migrated_pool: PostgresPool) -> None:
    clock = FakeClock()
    changes: list[tuple[str, frozenset[int], frozenset[int]]] = []

    def group(name: str) -> LeaseGroup:
        return LeaseGroup(
            migrated_pool,
            "nudges",
            8,
            ttl_s=TTL_S,
            holder=name,
            now_us=clock,
            on_change=lambda acquired, lost: changes.append((name, acquired, lost)),
        )

    a, b = group("a"), group("b")
    assert set(await a.renew()) == set(range(8))  # alone: every shard
    assert await b.renew() == {}  # none is free yet; b is now a member
    assert len(await a.renew()) == 4  # a sees two members and gives back its surplus
    assert set(await b.renew()) == {4, 5, 6, 7}
    held_a, held_b = await a.held(), await b.held()
    assert set(held_a).isdisjoint(held_b)
    assert set(held_a) | set(held_b) == set(range(8))
    assert await owners(migrated_pool, clock.us) == {s: "a" if s < 4 else "b" for s in range(8)}

    # a dies (stops renewing); b goes on renewing every TTL/3. Until a's leases expire, b
    # cannot take its shards...
    for _ in range(2):
        clock.advance(TTL_S / 3)
        assert set(await b.renew()) == {4, 5, 6, 7}
    # ...and a stops believing it holds them by its own deadline, before they can be taken.
    clock.advance(TTL_S / 3)
    assert await a.held() == {}
    assert not await a.holds(0)
    # b takes them at its first round once they have expired.
    held = await b.renew()
    assert set(held) == set(range(8))
    # The epoch fences a stale holder: every shard b took from a has a new epoch.
    assert all(held[s] == held_a[s] + 1 for s in range(4))
    assert ("b", frozenset(range(4)), frozenset()) in changes


async def test_release_hands_shards_over_at_once(migrated_pool: PostgresPool) -> None:
    clock = FakeClock()
    a = LeaseGroup(migrated_pool, "nudges", 4, ttl_s=TTL_S, holder="a", now_us=clock)
    b = LeaseGroup(migrated_pool, "nudges", 4, ttl_s=TTL_S, holder="b", now_us=clock)
    await a.renew()
    await b.renew()
    await a.release()
    assert set(await b.renew()) == set(range(4))  # no waiting for expiry


async def test_two_replicas_claiming_at_once_never_share_a_shard(
    migrated_pool: PostgresPool, postgres_dsn: str
) -> None:
    clock = FakeClock()
    pools = [await PostgresPool.open(postgres_dsn, max_size=2) for _ in range(3)]
    try:
        groups = [
            LeaseGroup(p, "nudges", 16, ttl_s=TTL_S, holder=f"r{i}", now_us=clock)
            for i, p in enumerate(pools)
        ]
        for _ in range(3):
            held = await asyncio.gather(*(g.renew() for g in groups))
            seen: set[int] = set()
            for h in held:
                assert seen.isdisjoint(h)
                seen |= set(h)
        assert seen == set(range(16))
        assert all(len(h) <= 6 for h in held)  # nobody above its share, ceil(16 / 3)
    finally:
        for p in pools:
            await p.close()


async def test_a_killed_replica_is_taken_over_in_real_time(migrated_pool: PostgresPool) -> None:
    """Short leases on the database's clock, with the background loops; waits on conditions."""
    ttl = 1.0
    a = LeaseGroup(migrated_pool, "nudges", 4, ttl_s=ttl, holder="a")
    b = LeaseGroup(migrated_pool, "nudges", 4, ttl_s=ttl, holder="b")
    a.start()
    b.start()
    try:

        async def balanced() -> bool:
            return len(await a.held()) == 2 and len(await b.held()) == 2

        await until(balanced, 60)
        await a.stop(release=False)  # killed: no release, its leases just stop being renewed

        async def taken_over() -> bool:
            return len(await b.held()) == 4

        await until(taken_over, 60)
    finally:
        await a.stop(release=False)
        await b.stop()


def test_shard_of_spreads_people() -> None:
    counts = [0] * 8
    for user_id in range(1, 801):
        counts[shard_of(user_id, 8)] += 1
    assert counts == [100] * 8

"""Nudge shards and cluster-wide jobs across replicas, leased on a real PostgreSQL.

Lease times come from PostgreSQL's clock (the default) with a short TTL, so a replica whose
renewals stop loses its shards within TTL + TTL/3 of real time; every wait is on a condition.
Decision times come from one fake clock shared by both replicas. The replicas' data is one
shared SQLite file (events included), so their features come from their own ingest
(`events_feed=False`); the feed from PostgreSQL's change feed is tested in test_shard_feed.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from pulsesync.server.app import RunningServer, running_server
from pulsesync.server.clock import FakeClock
from pulsesync.server.cluster import JOBS, LocalCluster, shard_of
from pulsesync.server.config import NudgeConfig, ServerConfig
from pulsesync.server.postgres_cluster import PostgresCluster
from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.v1 import common_pb2
from tests.server.nudges.support import device_pk_of, steps_event, store
from tests.support.postgres import until
from tests.support.server import pair_device

MIN = 60_000_000
MIDNIGHT = 1_767_225_600_000_000  # 2026-01-01T00:00Z; the default time zone is UTC
TTL_S = 1.5
WITHIN_S = 60.0


@pytest.fixture
async def pools(
    postgres_dsn: str, migrated_pool: PostgresPool
) -> AsyncIterator[list[PostgresPool]]:
    opened = [await PostgresPool.open(postgres_dsn, max_size=4) for _ in range(2)]
    try:
        yield opened
    finally:
        for pool in opened:
            await pool.close()


def holds(
    cluster: PostgresCluster, shard: int, *, new_epoch: bool = False
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        held = await cluster.nudge_shards.held()
        return shard in held and (not new_epoch or held[shard] > 1)

    return check


async def test_a_dead_replicas_shards_are_taken_over_and_no_decision_is_made_twice(
    tmp_path: Path, postgres_dsn: str, pools: list[PostgresPool]
) -> None:
    clock = FakeClock(MIDNIGHT + 60 * MIN)
    config = ServerConfig(port=0, data_dir=tmp_path, grace_seconds=0.5,
                          nudges=NudgeConfig(scheduler="manual", seed=1))  # fmt: skip
    a_cluster = PostgresCluster(pools[0], postgres_dsn, replica="a", ttl_s=TTL_S, events_feed=False)
    b_cluster = PostgresCluster(pools[1], postgres_dsn, replica="b", ttl_s=TTL_S, events_feed=False)
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(running_server(config, clock=clock, cluster=a_cluster))
        eng_a = a.app.nudges
        assert len(await a_cluster.nudge_shards.held()) == a_cluster.nudge_shards.shards
        watch = await pair_device(a, "ada", kind=common_pb2.DEVICE_KIND_WEARABLE_BRIDGE)
        _, user_id = await device_pk_of(a, watch.device_id)
        shard = shard_of(user_id, a_cluster.nudge_shards.shards)
        # Moving 01:00-01:05, then sitting: A (alone) serves the stretch at 02:45.
        walk = [steps_event(MIDNIGHT + (60 + m) * MIN, 100) for m in range(1, 6)]
        await store(a, watch.device_id, walk)
        await run_until(clock, [a], 3 * 60)
        assert await triggers(a) == [(2 * 60 + 45, "sedentary")]

        # B joins; then A stops renewing (as a killed replica would) and B takes everything.
        b = await stack.enter_async_context(running_server(config, clock=clock, cluster=b_cluster))
        await a_cluster.nudge_leases.stop(release=False)
        await a_cluster.job_leases.stop(release=False)
        await until(holds(b_cluster, shard, new_epoch=True), WITHIN_S)
        await until(_holds_nothing(a_cluster), WITHIN_S)
        assert await b_cluster.runs("nudge-outcomes")
        # B's features learn the same stretch (from another device of the person).
        phone = await pair_device(a, "ada", kind=common_pb2.DEVICE_KIND_PHONE)
        await store(b, phone.device_id, [steps_event(MIDNIGHT + (60 + m) * MIN, 100) for m in range(1, 6)])  # fmt: skip

        # Both tick until 11:00: A decides nothing (it holds nothing), B does not serve the
        # stretch A served again, and B takes the 08:30 scheduled decision point.
        await run_until(clock, [a, b], 11 * 60)
        assert await triggers(a) == [(2 * 60 + 45, "sedentary"), (8 * 60 + 30, "schedule")]
        assert user_id in eng_a.features.known_users()  # A still knows ada, yet did not decide


def _holds_nothing(cluster: PostgresCluster) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return not await cluster.nudge_shards.held()

    return check


async def run_until(clock: FakeClock, servers: list[RunningServer], minute: int) -> None:
    while clock.now_us() < MIDNIGHT + minute * MIN:
        clock.advance(15 * 60)
        for server in servers:
            await server.app.nudges.tick()


async def triggers(server: RunningServer) -> list[tuple[int, str]]:
    async with server.app.db.reader.execute(
        "SELECT decision_us, trigger FROM nudge_decisions ORDER BY decision_us"
    ) as cur:
        return [((int(t) - MIDNIGHT) // MIN, str(k)) for t, k in await cur.fetchall()]


async def test_replicas_share_the_shards_and_each_job_runs_on_one(
    postgres_dsn: str, pools: list[PostgresPool]
) -> None:
    a = PostgresCluster(pools[0], postgres_dsn, replica="a", ttl_s=TTL_S, events_feed=False)
    b = PostgresCluster(pools[1], postgres_dsn, replica="b", ttl_s=TTL_S, events_feed=False)
    await a.start()
    await b.start()
    try:

        async def shared() -> bool:
            ha, hb = await a.nudge_shards.held(), await b.nudge_shards.held()
            return bool(ha) and bool(hb) and len(ha) + len(hb) == a.nudge_shards.shards

        await until(shared, WITHIN_S)
        ha, hb = await a.nudge_shards.held(), await b.nudge_shards.held()
        assert not set(ha) & set(hb)
        for job in JOBS:
            assert [await a.runs(job), await b.runs(job)].count(True) <= 1
        # A graceful stop hands everything over at once.
        await a.stop()

        async def all_on_b() -> bool:
            return len(await b.nudge_shards.held()) == b.nudge_shards.shards and all(
                [await b.runs(job) for job in JOBS]
            )

        await until(all_on_b, WITHIN_S)
    finally:
        with contextlib.suppress(Exception):
            await a.stop()
        await b.stop()


async def test_a_single_process_holds_every_shard_and_runs_every_job() -> None:
    local = LocalCluster()
    assert len(await local.nudge_shards.held()) == local.nudge_shards.shards
    assert all([await local.runs(job) for job in JOBS])

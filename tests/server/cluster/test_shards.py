"""Nudge shards and cluster-wide jobs across replicas, leased on a real PostgreSQL.

Lease times come from PostgreSQL's clock (the default) with a short TTL, so a replica whose
renewals stop loses its shards within TTL + TTL/3 of real time; every wait is on a condition.
Decision times come from one fake clock shared by both replicas. The replicas' data is one
shared SQLite file (events included), so their features come from their own ingest
(`events_feed=False`); the feed from PostgreSQL's change feed is tested in test_shard_feed.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from pulsesync.server.app import RunningServer, running_server
from pulsesync.server.clock import FakeClock
from pulsesync.server.cluster import JOBS, LocalCluster, shard_of
from pulsesync.server.config import NudgeConfig, ServerConfig
from pulsesync.server.nudges.engine import NudgeEngine
from pulsesync.server.postgres_cluster import PostgresCluster
from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.v1 import common_pb2
from tests.server.nudges.support import device_pk_of, steps_event, store
from tests.support.postgres import until
from tests.support.server import pair_device

MIN = 60_000_000
MIDNIGHT = 1_767_225_600_000_000  # 2026-01-01T00:00Z; the default time zone is UTC
# Long enough that a loaded machine stalling the loop for a second or two does not let a live
# replica's leases lapse mid-test; short enough that a takeover takes seconds.
TTL_S = 4.0
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
        # The job leases are a group of their own, taken over at B's next renewal of it.
        await until(lambda: b_cluster.runs("nudge-outcomes"), WITHIN_S)
        # B's features learn the same stretch (from another device of the person).
        phone = await pair_device(a, "ada", kind=common_pb2.DEVICE_KIND_PHONE)
        await store(b, phone.device_id, [steps_event(MIDNIGHT + (60 + m) * MIN, 100) for m in range(1, 6)])  # fmt: skip

        # Both tick until 11:00: A decides nothing (it holds nothing), B does not serve the
        # stretch A served again, and B takes the 08:30 scheduled decision point.
        await run_until(clock, [a, b], 11 * 60)
        assert await triggers(a) == [(2 * 60 + 45, "sedentary"), (8 * 60 + 30, "schedule")]
        assert user_id in eng_a.features.known_users()  # A still knows ada, yet did not decide


async def test_a_replica_decides_for_the_shards_it_takes_without_waiting_for_its_periodic_tick(
    tmp_path: Path, postgres_dsn: str, pools: list[PostgresPool], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pulsesync.server.nudges.engine")
    clock = FakeClock(MIDNIGHT + 8 * 60 * MIN)  # 08:00
    # The periodic tick runs once, at start: only a takeover can make a replica tick again.
    config = ServerConfig(port=0, data_dir=tmp_path, grace_seconds=0.5,
                          nudges=NudgeConfig(tick_seconds=3600.0, seed=1))  # fmt: skip
    a_cluster = PostgresCluster(pools[0], postgres_dsn, replica="a", ttl_s=TTL_S, events_feed=False)
    b_cluster = PostgresCluster(pools[1], postgres_dsn, replica="b", ttl_s=TTL_S, events_feed=False)
    n = a_cluster.nudge_shards.shards
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(running_server(config, clock=clock, cluster=a_cluster))
        await until(_deciding_for(a.app.nudges, n), WITHIN_S)  # its tick at start

        # B joins: A gives back its surplus at its next renewal, B takes it at its own and
        # ticks with it at once.
        b = await stack.enter_async_context(running_server(config, clock=clock, cluster=b_cluster))
        eng_b = b.app.nudges

        async def balanced() -> bool:
            held = await b_cluster.nudge_shards.held()
            return len(held) == n // 2 and eng_b.deciding_for == held.keys()

        await until(balanced, WITHIN_S)
        watch = await pair_device(a, "ada", kind=common_pb2.DEVICE_KIND_WEARABLE_BRIDGE)
        _, user_id = await device_pk_of(a, watch.device_id)
        shard = shard_of(user_id, n)
        assert shard not in eng_b.deciding_for, "the test needs ada on a shard A holds"
        # B's features know ada (from its own ingest), yet it does not decide for her.
        await store(b, watch.device_id, [steps_event(MIDNIGHT + (7 * 60 + m) * MIN, 100) for m in range(50, 55)])  # fmt: skip
        await eng_b.flush()
        assert user_id in eng_b.features.known_users()

        # A stops renewing, as a killed replica would: B takes A's shards and ticks with them
        # before any periodic tick could (the next is an hour away).
        await a_cluster.nudge_leases.stop(release=False)
        await a_cluster.job_leases.stop(release=False)

        async def took_over() -> bool:  # logged at the end of the takeover tick
            return any(r.__dict__.get("nudge_shards_held") == n for r in caplog.records)

        await until(took_over, WITHIN_S)
        (line,) = [r for r in caplog.records if r.__dict__.get("nudge_shards_held") == n]
        assert line.__dict__["nudge_shards_taken"] == n // 2
        assert eng_b.deciding_for == set(range(n))

        # That tick started ada afresh at 08:00, so B takes the 08:30 decision point at its
        # next tick; had it first ticked at 08:31, that tick would only mark the time.
        clock.advance(31 * 60)
        made = await eng_b.tick()
        assert [(d.user_id, d.decision_us) for d in made] == [(user_id, clock.now_us())]
        assert await triggers(b) == [(8 * 60 + 31, "schedule")]


async def test_ticks_never_overlap(tmp_path: Path) -> None:
    config = ServerConfig(port=0, data_dir=tmp_path, nudges=NudgeConfig(scheduler="manual"))
    async with running_server(config, cluster=LocalCluster()) as server:
        engine = server.app.nudges
        inside, most = 0, 0
        release = asyncio.Event()

        async def pull() -> None:  # every tick passes here first
            nonlocal inside, most
            inside += 1
            most = max(most, inside)
            await release.wait()
            inside -= 1

        engine.pull = pull
        ticks = [asyncio.create_task(engine.tick()) for _ in range(2)]
        ticks.append(asyncio.create_task(engine.take_over(frozenset({1}))))
        await until(_is(lambda: inside == 1), WITHIN_S)
        # A tick cancelled while it waits for the running one leaves nothing held.
        ticks[1].cancel()
        release.set()
        results = await asyncio.gather(*ticks, return_exceptions=True)
        assert most == 1
        assert isinstance(results[1], asyncio.CancelledError)
        await asyncio.wait_for(engine.tick(), WITHIN_S)  # the lock is free again


def _is(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return predicate()

    return check


def _deciding_for(engine: NudgeEngine, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(engine.deciding_for) == count

    return check


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

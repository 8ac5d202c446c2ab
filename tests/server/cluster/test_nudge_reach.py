"""Devices reachable through another replica count in nudge decisions (a real PostgreSQL).

The replica deciding for a person reads, once per tick, which of the person's devices have a
SubscribeNudges stream open on another live replica or fetched lately on any replica
(`nudge_streams`, `nudge_fetches`; server/storage/postgres/reach.py). The record tests run two
clusters without servers; the gRPC tests run two servers whose data is one shared SQLite file
(as in test_shards.py), with decision times from one fake clock and lease times from
PostgreSQL's clock with a short TTL; every wait is on a condition. A push target registered or
removed on one replica is rung (`push_target_changed`) and read again by the other; the push
provider is a loopback webhook receiver.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from pulsesync.server.app import RunningServer, running_server
from pulsesync.server.clock import FakeClock
from pulsesync.server.cluster import NUDGE_SHARDS, LocalCluster, shard_of
from pulsesync.server.config import NudgeConfig, ServerConfig
from pulsesync.server.nudges.delivery import FETCH_REACH_US, NudgeDelivery
from pulsesync.server.postgres_cluster import PostgresCluster
from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.v1 import common_pb2, nudges_pb2, nudges_pb2_grpc
from tests.server.nudges.support import (
    PushReceiver,
    device_pk_of,
    push_receiver,
    register_push_target,
    steps_event,
    store,
)
from tests.support.postgres import until
from tests.support.server import PairedDevice, pair_device

MIN = 60_000_000
NOON = 1_767_268_800_000_000  # 2026-01-01T12:00Z; the default time zone is UTC
TTL_S = 3.0  # a live replica's membership must not lapse while a loaded machine stalls
WITHIN_S = 60.0
PEOPLE = range(1, 20)  # every person of these tests
PHONE = common_pb2.DEVICE_KIND_PHONE
PUSH_SECRET = "gateway-secret-0123456789"


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


def _cluster(pool: PostgresPool, dsn: str, name: str, *, sweep_s: float) -> PostgresCluster:
    return PostgresCluster(
        pool, dsn, replica=name, ttl_s=TTL_S, events_feed=False, reach_sweep_s=sweep_s
    )


async def _seen_by(cluster: PostgresCluster, since_us: int = 0) -> set[tuple[int, int, int]]:
    """(user, device, fetched_us) of every device `cluster` reads as reachable elsewhere."""
    found = await cluster.reach.elsewhere(PEOPLE, since_us)
    return {(d.user_id, d.device_pk, d.fetched_us) for d in found}


async def _rows(pool: PostgresPool, member: str) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM nudge_streams WHERE member = $1", member))


# -- the record ---------------------------------------------------------------------------------
async def test_a_stream_counts_while_its_replica_lives_and_a_dead_ones_rows_are_swept(
    postgres_dsn: str, pools: list[PostgresPool]
) -> None:
    # No sweep on its own here: the test sweeps, so it can look at the rows in between.
    a = _cluster(pools[0], postgres_dsn, "a", sweep_s=3600.0)
    b = _cluster(pools[1], postgres_dsn, "b", sweep_s=3600.0)
    await a.start()
    await b.start()
    try:
        b.reach.stream_opened(7, 70, "dev_70", PHONE)
        b.reach.stream_opened(8, 80, "dev_80", PHONE)
        b.reach.stream_closed(80)  # closed before it was written: never counts
        await b.nudge_reach.flushed()
        assert await _seen_by(a) == {(7, 70, 0)}
        assert await _seen_by(b) == set()  # its own streams are in its memory, not "elsewhere"
        # Only the people asked for.
        assert await a.reach.elsewhere([8, 9], 0) == []
        assert [d.device_id for d in await a.reach.elsewhere([7], 0)] == ["dev_70"]

        # B dies (no cleanup): its row stops counting once its membership expires ...
        await b.stop(release=False)
        await until(lambda: _is_empty(_seen_by(a)), WITHIN_S)
        assert await _rows(pools[0], "b") == 1
        # ... and is deleted by a live replica's sweep once expired for over a TTL.
        await until(_swept(a, pools[0], "b"), WITHIN_S)
    finally:
        await a.stop()
        await b.stop()


async def _is_empty(found: Awaitable[set[Any]]) -> bool:
    return not await found


def _swept(a: PostgresCluster, pool: PostgresPool, member: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        await a.nudge_reach.sweep()
        return await _rows(pool, member) == 0

    return check


async def test_a_graceful_stop_deletes_the_rows_and_a_stalled_replica_writes_them_again(
    postgres_dsn: str, pools: list[PostgresPool]
) -> None:
    a = _cluster(pools[0], postgres_dsn, "a", sweep_s=3600.0)
    b = _cluster(pools[1], postgres_dsn, "b", sweep_s=3600.0)
    await a.start()
    await b.start()
    try:
        b.reach.stream_opened(7, 70, "dev_70", PHONE)
        b.reach.stream_opened(9, 90, "dev_90", PHONE)
        await b.nudge_reach.flushed()
        # Another replica swept B's rows while B stalled: B's next sweep writes them again.
        await pools[0].execute("DELETE FROM nudge_streams WHERE member = 'b'")
        assert await _seen_by(a) == set()
        await b.nudge_reach.sweep()
        assert await _seen_by(a) == {(7, 70, 0), (9, 90, 0)}
        await b.stop()
        assert await _rows(pools[0], "b") == 0
        assert await _seen_by(a) == set()
    finally:
        await a.stop()
        await b.stop()


async def test_fetches_count_from_any_replica_within_the_window(
    postgres_dsn: str, pools: list[PostgresPool]
) -> None:
    a = _cluster(pools[0], postgres_dsn, "a", sweep_s=3600.0)
    b = _cluster(pools[1], postgres_dsn, "b", sweep_s=3600.0)
    await a.start()
    await b.start()
    try:
        b.reach.fetched(7, 70, "dev_70", PHONE, NOON)
        b.reach.fetched(7, 70, "dev_70", PHONE, NOON - MIN)  # older: the latest is kept
        await b.nudge_reach.flushed()
        a.reach.fetched(9, 90, "dev_90", PHONE, NOON - 2 * FETCH_REACH_US)
        await a.nudge_reach.flushed()
        since = NOON + MIN - FETCH_REACH_US
        # The fetch on B counts on A, and on B itself (a fetch belongs to no replica).
        assert await _seen_by(a, since) == {(7, 70, NOON)}
        assert await _seen_by(b, since) == {(7, 70, NOON)}
        assert await _seen_by(b, 0) == {(7, 70, NOON), (9, 90, NOON - 2 * FETCH_REACH_US)}
        # A crash keeps fetches (they are about the device, not the replica).
        await b.stop(release=False)
        assert await _seen_by(a, since) == {(7, 70, NOON)}
    finally:
        await a.stop()
        await b.stop()


async def test_one_process_has_nothing_elsewhere() -> None:
    local = LocalCluster()
    local.reach.stream_opened(7, 70, "dev_70", PHONE)
    local.reach.fetched(7, 70, "dev_70", PHONE, NOON)
    assert await local.reach.elsewhere(PEOPLE, 0) == []


# -- decisions over gRPC ------------------------------------------------------------------------
@dataclass
class Replica:
    server: RunningServer
    cluster: PostgresCluster


@pytest.fixture
def receiver() -> Iterator[PushReceiver]:
    with push_receiver() as r:
        yield r


@pytest.fixture
async def replicas(
    tmp_path: Path, postgres_dsn: str, pools: list[PostgresPool], receiver: PushReceiver
) -> AsyncIterator[tuple[Replica, Replica, FakeClock]]:
    clock = FakeClock(NOON - 100 * MIN)
    nudges = NudgeConfig(scheduler="manual", seed=3, push_url=receiver.url, push_secret=PUSH_SECRET)
    config = ServerConfig(port=0, data_dir=tmp_path, grace_seconds=0.5, nudges=nudges)
    out = []
    async with contextlib.AsyncExitStack() as stack:
        for name, pool in zip("ab", pools, strict=True):
            cluster = _cluster(pool, postgres_dsn, name, sweep_s=0.5)
            server = await stack.enter_async_context(
                running_server(config, clock=clock, cluster=cluster)
            )
            eng = server.app.nudges
            eng.catalog = replace(
                eng.catalog, policy=replace(eng.catalog.policy, cold_start_send_probability=1.0)
            )
            out.append(Replica(server, cluster))
        a, b = out

        async def shared() -> bool:
            ha, hb = await a.cluster.nudge_shards.held(), await b.cluster.nudge_shards.held()
            return bool(ha) and bool(hb) and len(ha) + len(hb) == NUDGE_SHARDS

        await until(shared, WITHIN_S)
        yield a, b, clock


async def _split(
    replicas: tuple[Replica, Replica, FakeClock], user_id: int
) -> tuple[Replica, Replica]:
    """(the replica deciding for the person, the other one)."""
    a, b, _ = replicas
    shard = shard_of(user_id, NUDGE_SHARDS)
    return (a, b) if shard in await a.cluster.nudge_shards.held() else (b, a)


async def _decide(decider: Replica, clock: FakeClock, dev: PairedDevice) -> list[Any]:
    """A long sedentary morning, then the noon decision point on the deciding replica."""
    eng = decider.server.app.nudges
    start = NOON - 100 * MIN
    await store(decider.server, dev.device_id, [steps_event(start + m * MIN, 2) for m in range(1, 95)])  # fmt: skip
    clock.set_us(start + 96 * MIN)
    await eng.tick()
    clock.set_us(NOON + 20 * MIN)
    return list(await eng.tick())


def _reachable_on(decider: Replica, user_id: int, device_pk: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return any((u, d) == (user_id, device_pk) for u, d, _ in await _seen_by(decider.cluster))

    return check


async def test_a_device_streaming_on_the_other_replica_is_reachable_and_gets_the_nudge(
    replicas: tuple[Replica, Replica, FakeClock],
) -> None:
    a, _, clock = replicas
    phone = await pair_device(a.server, "ada", kind=PHONE)
    device_pk, user_id = await device_pk_of(a.server, phone.device_id)
    decider, other = await _split(replicas, user_id)
    eng = decider.server.app.nudges
    async with grpc.aio.insecure_channel(other.server.address) as ch:
        stream = nudges_pb2_grpc.NudgeServiceStub(ch).SubscribeNudges(
            nudges_pb2.SubscribeNudgesRequest(), metadata=phone.metadata, timeout=WITHIN_S
        )
        await until(_reachable_on(decider, user_id, device_pk), WITHIN_S)
        assert not eng.delivery.has_stream(phone.device_id)  # not on the deciding replica

        made = [d for d in await _decide(decider, clock, phone) if d.user_id == user_id]
        assert len(made) == 1, made
        assert made[0].nudge is not None, made
        nudge = made[0].nudge
        assert made[0].eligibility.device_for[nudge.nudge_type] == device_pk
        assert nudge.device_id == phone.device_id
        # Rung to the other replica, which holds the stream and sends it from storage.
        got: Any = await stream.read()
        assert got.nudge.nudge_id == nudge.nudge_id
        assert got.nudge.device_id == phone.device_id

        stream.cancel()


@pytest.mark.parametrize("gone", ["stream closed", "replica died"])
async def test_a_stream_closed_or_on_a_dead_replica_no_longer_counts(
    replicas: tuple[Replica, Replica, FakeClock], gone: str
) -> None:
    a, _, clock = replicas
    phone = await pair_device(a.server, "dee", kind=PHONE)
    device_pk, user_id = await device_pk_of(a.server, phone.device_id)
    decider, other = await _split(replicas, user_id)
    async with grpc.aio.insecure_channel(other.server.address) as ch:
        stream = nudges_pb2_grpc.NudgeServiceStub(ch).SubscribeNudges(
            nudges_pb2.SubscribeNudgesRequest(), metadata=phone.metadata, timeout=WITHIN_S
        )
        await until(_reachable_on(decider, user_id, device_pk), WITHIN_S)
        if gone == "stream closed":
            stream.cancel()
        else:  # the other replica stops heartbeating, its stream still open, its row left
            await other.cluster.stop(release=False)
        await until(_not(_reachable_on(decider, user_id, device_pk)), WITHIN_S)
        made = [d for d in await _decide(decider, clock, phone) if d.user_id == user_id]
        assert [d.nudge for d in made] == [None]
        assert "no reachable device" in " ".join(made[0].eligibility.ineligible.values())
        stream.cancel()


def _not(check: Callable[[], Awaitable[bool]]) -> Callable[[], Awaitable[bool]]:
    async def negated() -> bool:
        return not await check()

    return negated


async def test_a_device_that_fetched_on_the_other_replica_is_reachable_and_fetches_the_nudge(
    replicas: tuple[Replica, Replica, FakeClock],
) -> None:
    a, _, clock = replicas
    phone = await pair_device(a.server, "bo", kind=PHONE)
    device_pk, user_id = await device_pk_of(a.server, phone.device_id)
    decider, other = await _split(replicas, user_id)
    async with grpc.aio.insecure_channel(other.server.address) as ch:
        stub = nudges_pb2_grpc.NudgeServiceStub(ch)
        fetch = nudges_pb2.FetchPendingNudgesRequest()
        first = await stub.FetchPendingNudges(fetch, metadata=phone.metadata, timeout=WITHIN_S)
        assert list(first.nudges) == []
        await until(_reachable_on(decider, user_id, device_pk), WITHIN_S)
        made = [d for d in await _decide(decider, clock, phone) if d.user_id == user_id]
        assert len(made) == 1, made
        assert made[0].nudge is not None, made
        got = await stub.FetchPendingNudges(fetch, metadata=phone.metadata, timeout=WITHIN_S)
        assert [n.nudge_id for n in got.nudges] == [made[0].nudge.nudge_id]


async def test_without_a_way_in_anywhere_no_nudge_is_made(
    replicas: tuple[Replica, Replica, FakeClock],
) -> None:
    a, _, clock = replicas
    phone = await pair_device(a.server, "cy", kind=PHONE)
    _, user_id = await device_pk_of(a.server, phone.device_id)
    decider, _ = await _split(replicas, user_id)
    made = [d for d in await _decide(decider, clock, phone) if d.user_id == user_id]
    assert [d.nudge for d in made] == [None]
    assert "no reachable device" in " ".join(made[0].eligibility.ineligible.values())


# -- push targets -------------------------------------------------------------------------------
def _counts(delivery: NudgeDelivery, user_id: int, device_pk: int) -> Callable[[], Awaitable[bool]]:
    """Whether the replica's decisions count the device as reachable (here: by push)."""

    async def check() -> bool:
        return any(r.device_pk == device_pk for r in delivery.reachable(user_id, NOON))

    return check


async def test_a_push_target_registered_on_the_other_replica_counts_until_removed_there(
    replicas: tuple[Replica, Replica, FakeClock], receiver: PushReceiver
) -> None:
    a, _, clock = replicas
    phone = await pair_device(a.server, "fay", kind=PHONE)
    device_pk, user_id = await device_pk_of(a.server, phone.device_id)
    decider, other = await _split(replicas, user_id)
    eng = decider.server.app.nudges
    # The deciding replica read its push targets (as at its first decision) before the phone
    # registered one; the phone's only way in is that target, registered on the other replica.
    await eng.delivery.load_push_targets()
    assert not await _counts(eng.delivery, user_id, device_pk)()
    await register_push_target(other.server.address, phone, "fcm:fay", WITHIN_S)
    await until(_counts(eng.delivery, user_id, device_pk), WITHIN_S)
    assert eng.delivery.channel_for(device_pk) == "push"

    made = [d for d in await _decide(decider, clock, phone) if d.user_id == user_id]
    assert len(made) == 1, made
    nudge = made[0].nudge
    assert nudge is not None, made
    assert made[0].eligibility.device_for[nudge.nudge_type] == device_pk
    await eng.feedback_settled()
    payloads = [json.loads(body) for _, body in receiver.posts]
    assert [(p["push_token"], p["nudge_id"], p["device_id"]) for p in payloads] == [
        ("fcm:fay", nudge.nudge_id, phone.device_id)
    ]

    # Removed on the other replica (an empty token): it stops counting on the deciding one.
    await register_push_target(other.server.address, phone, "", WITHIN_S)
    await until(_not(_counts(eng.delivery, user_id, device_pk)), WITHIN_S)
    assert eng.delivery.channel_for(device_pk) == "pending"


async def test_after_a_lost_ring_every_push_target_is_read_again(
    replicas: tuple[Replica, Replica, FakeClock], pools: list[PostgresPool]
) -> None:
    a, _, clock = replicas
    phone = await pair_device(a.server, "gus", kind=PHONE)
    device_pk, user_id = await device_pk_of(a.server, phone.device_id)
    decider, other = await _split(replicas, user_id)
    eng = decider.server.app.nudges
    await eng.delivery.load_push_targets()
    await register_push_target(other.server.address, phone, "fcm:gus", WITHIN_S)
    await until(_counts(eng.delivery, user_id, device_pk), WITHIN_S)
    # The target is removed and its ring lost (written without one, as if the other replica
    # died between its commit and its ring): the deciding replica still counts it ...
    await other.server.app.nudges._storage.set_push_target(user_id, device_pk, "", clock.now_us())
    assert await _counts(eng.delivery, user_id, device_pk)()
    # ... until its listener reconnects, which says "rings may have been missed".
    pid = decider.cluster.doorbell.backend_pid
    assert pid is not None
    await pools[0].fetchval("SELECT pg_terminate_backend($1)", pid)
    await until(_not(_counts(eng.delivery, user_id, device_pk)), WITHIN_S)
    made = [d for d in await _decide(decider, clock, phone) if d.user_id == user_id]
    assert [d.nudge for d in made] == [None]
    assert "no reachable device" in " ".join(made[0].eligibility.ineligible.values())

"""The LISTEN/NOTIFY doorbell between replicas, against a real server."""

from __future__ import annotations

import pytest

from pulsesync.server.storage.postgres.doorbell import Doorbell, ring
from pulsesync.server.storage.postgres.pool import PostgresPool
from tests.support.postgres import until


class Heard:
    def __init__(self) -> None:
        self.payloads: list[str | None] = []

    def __call__(self, payload: str | None) -> None:
        self.payloads.append(payload)

    def has(self, payload: str | None):
        async def check() -> bool:
            return payload in self.payloads

        return check


@pytest.fixture
async def bell(postgres_dsn: str):
    b = Doorbell(postgres_dsn, keepalive_s=0.2)
    await b.start()
    yield b
    await b.stop()


async def test_a_ring_arrives_on_commit_and_not_before(
    bell: Doorbell, migrated_pool: PostgresPool
) -> None:
    heard = Heard()
    await bell.subscribe("profile_changed", heard)
    async with migrated_pool.transaction() as tx:
        await ring(tx, "profile_changed", "user:7:version:3")
        # Rings commit in order: once "later" (sent after) is heard, the open one is not.
        await ring_now(migrated_pool, "profile_changed", "later")
        await until(heard.has("later"))
        assert "user:7:version:3" not in heard.payloads
    await until(heard.has("user:7:version:3"))


async def ring_now(pool: PostgresPool, channel: str, payload: str) -> None:
    async with pool.transaction() as conn:
        await ring(conn, channel, payload)


async def test_a_rolled_back_ring_is_never_heard(
    bell: Doorbell, migrated_pool: PostgresPool
) -> None:
    heard = Heard()
    await bell.subscribe("consent_changed", heard)

    async def rolled_back() -> None:
        async with migrated_pool.transaction() as tx:
            await ring(tx, "consent_changed", "user:1")
            raise RuntimeError("changed my mind")

    with pytest.raises(RuntimeError):
        await rolled_back()
    await ring_now(migrated_pool, "consent_changed", "user:2")
    await until(heard.has("user:2"))
    assert heard.payloads == ["user:2"]


async def test_channels_and_unsubscribe(bell: Doorbell, migrated_pool: PostgresPool) -> None:
    a, b = Heard(), Heard()
    stop_a = await bell.subscribe("revoked", a)
    await bell.subscribe("revoked", b)
    await ring_now(migrated_pool, "revoked", "device:1")
    await until(a.has("device:1"))
    await until(b.has("device:1"))
    stop_a()
    await ring_now(migrated_pool, "revoked", "device:2")
    await until(b.has("device:2"))
    assert "device:2" not in a.payloads


async def test_reconnects_and_tells_watchers_to_read_again(
    bell: Doorbell, migrated_pool: PostgresPool
) -> None:
    heard = Heard()
    await bell.subscribe("nudge_ready", heard)
    pid = bell.backend_pid
    assert pid is not None
    # The listening session dies (a failover, an idle timeout, an operator).
    assert await migrated_pool.fetchval("SELECT pg_terminate_backend($1)", pid)

    async def reconnected() -> bool:
        return bell.connects >= 2 and bell.backend_pid not in (None, pid)

    await until(reconnected)
    await until(heard.has(None))  # "you may have missed rings": read again
    await ring_now(migrated_pool, "nudge_ready", "device:9")
    await until(heard.has("device:9"))


async def test_two_replicas_both_hear_a_ring(
    postgres_dsn: str, migrated_pool: PostgresPool
) -> None:
    bells = [Doorbell(postgres_dsn, keepalive_s=0.2) for _ in range(2)]
    heard = [Heard(), Heard()]
    for b, h in zip(bells, heard, strict=True):
        await b.start()
        await b.subscribe("profile_changed", h)
    try:
        await ring_now(migrated_pool, "profile_changed", "user:3")
        for h in heard:
            await until(h.has("user:3"))
    finally:
        for b in bells:
            await b.stop()


async def test_payloads_are_ids_not_data(migrated_pool: PostgresPool) -> None:
    async with migrated_pool.connection() as conn:
        with pytest.raises(ValueError, match="not data"):
            await ring(conn, "profile_changed", "x" * 1000)
        with pytest.raises(ValueError, match="bad doorbell channel"):
            await ring(conn, "Profile; DROP", "")


async def test_subscribing_while_the_keepalive_runs_keeps_the_connection(
    postgres_dsn: str, migrated_pool: PostgresPool
) -> None:
    """LISTEN and the keepalive share one connection: they must take turns, not collide."""
    # A keepalive every 10 ms collides with the LISTENs below many times over, without turning
    # the test into a busy loop that a loaded machine cannot get through.
    bell = Doorbell(postgres_dsn, keepalive_s=0.01)
    await bell.start()
    try:
        heard = [Heard() for _ in range(40)]
        for i, h in enumerate(heard):
            await bell.subscribe(f"channel_{i}", h)
        for i in range(40):
            await ring_now(migrated_pool, f"channel_{i}", "x")
        for h in heard:
            await until(h.has("x"))
        assert bell.connects == 1
    finally:
        await bell.stop()

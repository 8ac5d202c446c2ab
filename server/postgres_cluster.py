"""The PostgreSQL cluster: N replicas over one PostgreSQL acting as one (see server/cluster.py).

Kept apart from `pulsesync.server.cluster` so that a SQLite server, installed without the
`postgres` extra, never imports the driver.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pulsesync.server.cluster import (
    JOBS,
    NUDGE_SHARDS,
    Callback,
    NudgeReach,
    Shards,
    Signals,
    TakenCallback,
    _check_topic,
)
from pulsesync.server.storage.postgres.doorbell import Doorbell, ring
from pulsesync.server.storage.postgres.feed import PostgresEventFeed
from pulsesync.server.storage.postgres.leases import DEFAULT_TTL_S, LeaseGroup, NowUs
from pulsesync.server.storage.postgres.pool import Connection, PostgresPool
from pulsesync.server.storage.postgres.reach import SWEEP_S, PostgresNudgeReach

if TYPE_CHECKING:
    from pulsesync.server.nudges.shard_feed import EventFeedStorage

log = logging.getLogger(__name__)


class PostgresSignals:
    """Signals over the LISTEN/NOTIFY doorbell; payload "key sender" (ids only, never data)."""

    def __init__(self, pool: PostgresPool, doorbell: Doorbell, sender: str) -> None:
        self._pool = pool
        self._doorbell = doorbell
        self._sender = sender

    async def ring(self, topic: str, key: int, *, conn: Connection | None = None) -> None:
        _check_topic(topic)
        payload = f"{int(key)} {self._sender}"
        if conn is not None:
            await ring(conn, topic, payload)
            return
        async with self._pool.transaction() as tx:
            await ring(tx, topic, payload)

    async def subscribe(self, topic: str, callback: Callback) -> Callable[[], None]:
        _check_topic(topic)

        def heard(payload: str | None) -> None:
            if payload is None:
                callback(None)
                return
            key, _, sender = payload.partition(" ")
            if sender == self._sender:
                return  # this replica acted on its own change in-process
            try:
                parsed = int(key)
            except ValueError:
                log.warning("ignoring a malformed cluster signal", extra={"topic": topic})
                return
            callback(parsed)

        return await self._doorbell.subscribe(topic, heard)


class LeasedShards:
    """The nudge shards this replica holds in a lease group; told of the shards it takes by
    the group's renewal that took them."""

    def __init__(self, group: LeaseGroup) -> None:
        self.shards = group.shards
        self._group = group
        self._taken: list[TakenCallback] = []
        group.on_change = self._changed

    async def held(self) -> dict[int, int]:
        return await self._group.held()

    def on_taken(self, callback: TakenCallback) -> Callable[[], None]:
        self._taken.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._taken.remove(callback)

        return unsubscribe

    def _changed(self, acquired: frozenset[int], lost: frozenset[int]) -> None:
        if not acquired:
            return
        for callback in list(self._taken):
            try:
                callback(acquired)
            except Exception:  # never fail the renewal that took them
                log.exception("a nudge shard takeover callback failed")


class PostgresCluster:
    """N replicas over one PostgreSQL: see the module docstring."""

    def __init__(
        self,
        pool: PostgresPool,
        dsn: str,
        *,
        replica: str | None = None,
        ttl_s: float = DEFAULT_TTL_S,
        now_us: NowUs | None = None,
        nudge_shards: int = NUDGE_SHARDS,
        keepalive_s: float | None = None,
        events_feed: bool = True,
        reach_sweep_s: float = SWEEP_S,
    ) -> None:
        """`events_feed=False` keeps the nudge features on this process's bus (for data
        ingested elsewhere than the PostgreSQL events table)."""
        self.replica = replica or secrets.token_hex(8)
        kwargs: dict[str, Any] = {} if keepalive_s is None else {"keepalive_s": keepalive_s}
        self.doorbell = Doorbell(dsn, **kwargs)
        self.signals: Signals = PostgresSignals(pool, self.doorbell, self.replica)
        self.nudge_leases = LeaseGroup(
            pool, "nudges", nudge_shards, ttl_s=ttl_s, holder=self.replica, now_us=now_us
        )
        self.job_leases = LeaseGroup(
            pool, "jobs", len(JOBS), ttl_s=ttl_s, holder=self.replica, now_us=now_us
        )
        self.nudge_shards: Shards = LeasedShards(self.nudge_leases)
        # Streams count while this replica's membership of the nudge lease group is live.
        self.nudge_reach = PostgresNudgeReach(
            pool, self.replica, group="nudges", ttl_s=ttl_s, sweep_s=reach_sweep_s, now_us=now_us
        )
        self.reach: NudgeReach = self.nudge_reach
        self.events: EventFeedStorage | None = PostgresEventFeed(pool) if events_feed else None

    async def runs(self, job: str) -> bool:
        return await self.job_leases.holds(JOBS.index(job))

    async def start(self) -> None:
        await self.doorbell.start()
        # A first round before serving, so a lone replica decides from its first tick.
        for group in (self.nudge_leases, self.job_leases):
            with contextlib.suppress(Exception):
                await group.renew()
            group.start()
        # After the first round: this replica's stream rows count from its first stream.
        await self.nudge_reach.start()

    async def stop(self, *, release: bool = True) -> None:
        """Stop renewing (giving the leases back unless `release` is False, as a crash would
        not, and leaving this replica's stream rows to expire with its membership) and stop
        listening."""
        try:
            await self.nudge_reach.stop(release=release)
        except Exception:
            log.warning("deleting this replica's nudge streams failed; they expire")
        for group in (self.nudge_leases, self.job_leases):
            try:
                await group.stop(release=release)
            except Exception:
                log.warning("releasing the %s leases failed; they expire", group.group)
        await self.doorbell.stop()

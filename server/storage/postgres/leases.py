"""Leases over shards of work, so that each shard is worked on by one replica at a time.

A lease group (e.g. "nudges" with 64 shards of people, or "jobs/retention" with one) is a set
of rows in `leases`, each held by one replica until its expiry. Every replica of the group
heartbeats in `lease_members` and, every TTL/3, renews its leases and takes its fair share
(the group's shards over the live members) from shards that are free or expired, releasing
any surplus when a new replica joins. So:

* a shard has at most one holder at any time: the row is the lock, and a replica takes a shard
  only when its lease has expired (or was released);
* a replica believes it holds a shard only until its own deadline (the renewal's start plus
  the TTL), which comes before the lease in the table can expire, so two replicas never both
  believe it (clock rates permitting; the epoch, +1 at every change of holder, fences writes
  that must not come from a stale holder);
* a replica that dies loses its shards when their leases expire: another one takes them at its
  next renewal, within TTL + TTL/3 of the last renewal.

Times come from a clock in microseconds; the default is the database's clock, which all
replicas share, so their own clocks' offsets do not matter. Tests inject one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from typing import Final

from pulsesync.server.storage.postgres.pool import Connection, PostgresPool

log = logging.getLogger(__name__)

DEFAULT_TTL_S: Final = 6.0
NowUs = Callable[[], Awaitable[int]]
OnChange = Callable[[frozenset[int], frozenset[int]], None]  # (acquired, lost)


class LeaseGroup:
    """This replica's part of one lease group."""

    def __init__(
        self,
        pool: PostgresPool,
        group: str,
        shards: int,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        holder: str | None = None,
        now_us: NowUs | None = None,
        on_change: OnChange | None = None,
    ) -> None:
        if shards < 1:
            raise ValueError("a lease group needs at least one shard")
        self.group = group
        self.shards = shards
        self.holder = holder or secrets.token_hex(8)
        self._pool = pool
        self._ttl_us = int(ttl_s * 1e6)
        self._now_us = now_us or self._database_now
        # Told of every change of the shards held, at the end of the renewal that made it.
        self.on_change = on_change
        self._held: dict[int, int] = {}  # shard -> epoch
        self._deadline_us = 0  # our own view: we hold nothing at or after this
        self._task: asyncio.Task[None] | None = None

    @property
    def ttl_s(self) -> float:
        return self._ttl_us / 1e6

    async def _database_now(self) -> int:
        value = await self._pool.fetchval(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint"
        )
        return int(value)

    async def held(self) -> dict[int, int]:
        """The shards held now (with their epochs); empty once our deadline has passed."""
        if await self._now_us() >= self._deadline_us:
            return {}
        return dict(self._held)

    async def holds(self, shard: int) -> bool:
        return shard in await self.held()

    async def renew(self) -> dict[int, int]:
        """One round: heartbeat, renew, take a fair share, release a surplus. The shards held."""
        now = await self._now_us()
        expire = now + self._ttl_us
        async with self._pool.transaction() as conn:
            held = await self._renew_in(conn, now, expire)
        before = set(self._held) if now < self._deadline_us else set()
        self._held = held
        self._deadline_us = expire
        acquired, lost = frozenset(set(held) - before), frozenset(before - set(held))
        if (acquired or lost) and self.on_change is not None:
            self.on_change(acquired, lost)
        return dict(held)

    async def _renew_in(self, conn: Connection, now: int, expire: int) -> dict[int, int]:
        grp = self.group
        await conn.execute(
            "INSERT INTO lease_members (grp, holder, expire_us) VALUES ($1, $2, $3)"
            " ON CONFLICT (grp, holder) DO UPDATE SET expire_us = excluded.expire_us",
            grp,
            self.holder,
            expire,
        )
        # Every shard has a row (free: holder ''), so taking one is an UPDATE of a locked row.
        await conn.execute(
            "INSERT INTO leases (grp, shard, holder, expire_us, epoch)"
            " SELECT $1, s, '', 0, 0 FROM generate_series(0, $2 - 1) AS s"
            " ON CONFLICT DO NOTHING",
            grp,
            self.shards,
        )
        members = int(
            await conn.fetchval(
                "SELECT count(*) FROM lease_members WHERE grp = $1 AND expire_us > $2", grp, now
            )
        )
        target = math.ceil(self.shards / max(members, 1))
        mine = {
            int(r["shard"]): int(r["epoch"])
            for r in await conn.fetch(
                "UPDATE leases SET expire_us = $3 WHERE grp = $1 AND holder = $2"
                " AND expire_us > $4 RETURNING shard, epoch",
                grp,
                self.holder,
                expire,
                now,
            )
        }
        if len(mine) > target:
            # A replica joined: give back the surplus (highest shards first) at once.
            surplus = sorted(mine)[target:]
            await conn.execute(
                "UPDATE leases SET holder = '', expire_us = 0"
                " WHERE grp = $1 AND holder = $2 AND shard = ANY($3::integer[])",
                grp,
                self.holder,
                surplus,
            )
            for shard in surplus:
                del mine[shard]
        elif len(mine) < target:
            # SKIP LOCKED: two replicas taking shards at once take different ones.
            for r in await conn.fetch(
                "UPDATE leases SET holder = $2, expire_us = $3, epoch = epoch + 1"
                " WHERE (grp, shard) IN ("
                "   SELECT grp, shard FROM leases WHERE grp = $1 AND expire_us <= $4"
                "   ORDER BY shard LIMIT $5 FOR UPDATE SKIP LOCKED)"
                " RETURNING shard, epoch",
                grp,
                self.holder,
                expire,
                now,
                target - len(mine),
            ):
                mine[int(r["shard"])] = int(r["epoch"])
        return mine

    async def release(self) -> None:
        """Give every lease back now (a graceful stop): others take them at their next round."""
        self._held = {}
        self._deadline_us = 0
        async with self._pool.transaction() as conn:
            await conn.execute(
                "UPDATE leases SET holder = '', expire_us = 0 WHERE grp = $1 AND holder = $2",
                self.group,
                self.holder,
            )
            await conn.execute(
                "DELETE FROM lease_members WHERE grp = $1 AND holder = $2", self.group, self.holder
            )

    # -- the background loop --------------------------------------------------------------
    def start(self) -> None:
        """Renew every TTL/3 in the background until stop()."""
        self._task = asyncio.create_task(self._run(), name=f"leases-{self.group}")

    async def stop(self, *, release: bool = True) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if release:
            await self.release()

    async def _run(self) -> None:
        interval = self.ttl_s / 3
        while True:
            try:
                await self.renew()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Our deadline keeps running: past it we hold nothing, whatever happens here.
                log.warning("lease renewal of %s failed; retrying", self.group, exc_info=True)
            await asyncio.sleep(interval)

"""The shared record of how devices take nudges across replicas (see NudgeReach in
server/cluster.py): `nudge_streams` (the SubscribeNudges streams open on each replica) and
`nudge_fetches` (when each device's app last fetched its pending nudges, on any replica).

Writes stay off the request path: opening or closing a stream, or a fetch, changes this
replica's view in memory and wakes one writer task, which writes every change made since its
last round in one transaction (a burst of reconnects after a failover is a few transactions,
not one per stream). The writer writes what is true now (the streams open here, the latest
fetches), so a stream opened and closed before a round is written once or not at all, and
rounds never reorder a device's open and close.

A stream row counts only while its replica's membership of the "nudges" lease group is live
(`lease_members`, heartbeat every TTL/3): the rows of a replica that died are ignored from
the moment its membership expires. Every sweep interval each replica deletes the rows of
replicas whose membership has been expired for over a TTL (now and then, also of replicas
with no membership row), and checks that its own rows are all there: a replica that stalled
for longer finds them deleted and writes them again. Times of membership come from the database's clock, as the leases' do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

from pulsesync.server.cluster import DeviceElsewhere
from pulsesync.server.storage.postgres.leases import DEFAULT_TTL_S, NowUs
from pulsesync.server.storage.postgres.pool import Connection, PostgresPool

log = logging.getLogger(__name__)

# How often each replica deletes the dead replicas' stream rows and checks its own.
SWEEP_S: Final = 30.0
# Every this many sweeps, also rows whose replica has no membership row at all (left by a
# race with a graceful stop); the others go by the expired memberships, an indexed delete.
FULL_SWEEP_EVERY: Final = 20
# After a failed write round, the next one waits this long (the changes are kept).
RETRY_S: Final = 1.0

_DB_NOW: Final = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint"


@dataclass(frozen=True, slots=True)
class _Open:
    user_id: int
    device_id: str
    kind: int


@dataclass(frozen=True, slots=True)
class _Fetch:
    user_id: int
    device_id: str
    kind: int
    at_us: int


class PostgresNudgeReach:
    """This replica's part of the record: its streams and fetches written, the others' read."""

    def __init__(
        self,
        pool: PostgresPool,
        member: str,
        *,
        group: str = "nudges",
        ttl_s: float = DEFAULT_TTL_S,
        sweep_s: float = SWEEP_S,
        now_us: NowUs | None = None,
    ) -> None:
        self.member = member
        self._pool = pool
        self._group = group
        self._grace_us = int(ttl_s * 1e6)
        self._sweep_s = sweep_s
        self._now_us = now_us
        self._open: dict[int, _Open] = {}  # device_pk -> its stream here
        self._dirty: set[int] = set()  # device_pks whose row may differ from _open
        self._fetches: dict[int, _Fetch] = {}  # device_pk -> latest fetch not yet written
        self._wake = asyncio.Event()
        # One write round at a time: a round takes the pending changes out before it commits,
        # so `flushed` waits for a round in flight instead of finding nothing left to write.
        self._round = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0  # write rounds that committed (for tests and the bench)
        self._sweeps = 0

    # -- this replica's changes (in memory; written by the writer task) -----------------------
    def stream_opened(self, user_id: int, device_pk: int, device_id: str, kind: int) -> None:
        self._open[device_pk] = _Open(user_id, device_id, kind)
        self._changed(device_pk)

    def stream_closed(self, device_pk: int) -> None:
        self._open.pop(device_pk, None)
        self._changed(device_pk)

    def fetched(self, user_id: int, device_pk: int, device_id: str, kind: int, at_us: int) -> None:
        old = self._fetches.get(device_pk)
        if old is None or old.at_us <= at_us:
            self._fetches[device_pk] = _Fetch(user_id, device_id, kind, at_us)
        self._wake.set()

    def _changed(self, device_pk: int) -> None:
        self._dirty.add(device_pk)
        self._wake.set()

    # -- the deciding replica's read ------------------------------------------------------------
    async def elsewhere(
        self, user_ids: Collection[int], fetched_since_us: int
    ) -> list[DeviceElsewhere]:
        if not user_ids:
            return []
        now = await self._now_us() if self._now_us is not None else None
        rows = await self._pool.fetch(
            "SELECT s.user_id, s.device_pk, s.device_id, s.kind, 0::bigint AS fetched_us"
            " FROM nudge_streams s JOIN lease_members m"
            "   ON m.grp = $1 AND m.holder = s.member"
            f" AND m.expire_us > COALESCE($3::bigint, {_DB_NOW})"
            " WHERE s.member <> $2 AND s.user_id = ANY($4::bigint[])"
            " UNION ALL"
            " SELECT user_id, device_pk, device_id, kind, fetched_us FROM nudge_fetches"
            " WHERE user_id = ANY($4::bigint[]) AND fetched_us > $5",
            self._group,
            self.member,
            now,
            sorted(user_ids),
            fetched_since_us,
        )
        return [
            DeviceElsewhere(int(r[0]), int(r[1]), str(r[2]), int(r[3]), int(r[4])) for r in rows
        ]

    # -- the writer -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Forget rows a previous process of the same id left (it has no stream now), then
        write in the background until stop()."""
        try:
            await self._pool.execute("DELETE FROM nudge_streams WHERE member = $1", self.member)
        except Exception:
            log.warning("forgetting this replica id's earlier nudge streams failed", exc_info=True)
        self._task = asyncio.create_task(self._run(), name="nudge-reach")

    async def stop(self, *, release: bool = True) -> None:
        """Stop writing; with `release`, write the last fetches and delete this replica's
        stream rows (a crash leaves them to expire with its membership)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if release:
            self._open.clear()
            async with self._pool.transaction() as tx:
                await self._write_fetches(tx)
                await tx.execute("DELETE FROM nudge_streams WHERE member = $1", self.member)

    async def flushed(self) -> None:
        """Write every change made so far now (for tests; the writer does it on its own)."""
        async with self._round, self._pool.transaction() as tx:
            await self._write(tx)

    async def _run(self) -> None:
        next_sweep = time.monotonic() + self._sweep_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_sweep - time.monotonic())):
                    await self._wake.wait()
            self._wake.clear()
            try:
                async with self._round, self._pool.transaction() as tx:
                    await self._write(tx)
                if time.monotonic() >= next_sweep:
                    await self.sweep()
                    next_sweep = time.monotonic() + self._sweep_s
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("writing the nudge reach record failed; retrying", exc_info=True)
                self._wake.set()  # the changes were kept: try again after a pause
                await asyncio.sleep(RETRY_S)

    async def _write(self, tx: Connection) -> None:
        """Write the streams changed since the last round and the fetches not yet written.
        On failure (or cancellation) the changes stay to be written by a later round."""
        dirty, self._dirty = self._dirty, set()
        try:
            await self._write_streams(tx, dirty)
            await self._write_fetches(tx)
        except BaseException:
            self._dirty |= dirty
            raise
        self.rounds += 1

    async def _write_streams(self, tx: Connection, pks: Collection[int]) -> None:
        gone = [pk for pk in pks if pk not in self._open]
        here = [(pk, self._open[pk]) for pk in pks if pk in self._open]
        if gone:
            await tx.execute(
                "DELETE FROM nudge_streams WHERE member = $1 AND device_pk = ANY($2::bigint[])",
                self.member,
                gone,
            )
        if here:
            await tx.execute(
                "INSERT INTO nudge_streams"
                " (member, device_pk, user_id, device_id, kind, since_us)"
                f" SELECT $1, d, u, i, k, {_DB_NOW}"
                " FROM unnest($2::bigint[], $3::bigint[], $4::text[], $5::integer[])"
                "   AS t(d, u, i, k)"
                " ON CONFLICT (member, device_pk) DO UPDATE SET user_id = excluded.user_id,"
                " device_id = excluded.device_id, kind = excluded.kind,"
                " since_us = excluded.since_us",
                self.member,
                [pk for pk, _ in here],
                [o.user_id for _, o in here],
                [o.device_id for _, o in here],
                [o.kind for _, o in here],
            )

    async def _write_fetches(self, tx: Connection) -> None:
        fetches, self._fetches = self._fetches, {}
        if not fetches:
            return
        try:
            await tx.execute(
                "INSERT INTO nudge_fetches (user_id, device_pk, device_id, kind, fetched_us)"
                " SELECT u, d, i, k, f"
                " FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::integer[],"
                "   $5::bigint[]) AS t(u, d, i, k, f)"
                " ON CONFLICT (user_id, device_pk) DO UPDATE SET device_id = excluded.device_id,"
                " kind = excluded.kind,"
                " fetched_us = GREATEST(nudge_fetches.fetched_us, excluded.fetched_us)",
                [f.user_id for f in fetches.values()],
                list(fetches),
                [f.device_id for f in fetches.values()],
                [f.kind for f in fetches.values()],
                [f.at_us for f in fetches.values()],
            )
        except BaseException:
            for pk, f in fetches.items():
                if pk not in self._fetches or self._fetches[pk].at_us < f.at_us:
                    self._fetches[pk] = f
            raise

    async def sweep(self) -> None:
        """Delete the stream rows of replicas gone for over a TTL; write ours again if some
        are missing (deleted while this replica stalled)."""
        now = await self._now_us() if self._now_us is not None else None
        self._sweeps += 1
        async with self._pool.transaction() as tx:
            if self._sweeps % FULL_SWEEP_EVERY == 1:
                await tx.execute(
                    "DELETE FROM nudge_streams s WHERE NOT EXISTS ("
                    "   SELECT 1 FROM lease_members m WHERE m.grp = $1 AND m.holder = s.member"
                    f"   AND m.expire_us > COALESCE($2::bigint, {_DB_NOW}) - $3)",
                    self._group,
                    now,
                    self._grace_us,
                )
            else:
                await tx.execute(
                    "DELETE FROM nudge_streams WHERE member IN ("
                    "   SELECT holder FROM lease_members WHERE grp = $1"
                    f"   AND expire_us <= COALESCE($2::bigint, {_DB_NOW}) - $3)",
                    self._group,
                    now,
                    self._grace_us,
                )
            mine = int(
                await tx.fetchval(
                    "SELECT count(*) FROM nudge_streams WHERE member = $1", self.member
                )
            )
            if mine != len(self._open) and not self._dirty:
                log.info("nudge reach: writing this replica's %d streams again", len(self._open))
                await tx.execute("DELETE FROM nudge_streams WHERE member = $1", self.member)
                await self._write_streams(tx, list(self._open))

"""The ingest writer on PostgreSQL: group commit of validated batches, with every promise of
the SQLite writer (server/timeline/committer.py).

* Ack only after commit: a batch's future resolves once its transaction has committed.
* Dedupe on (device, seq): a seq already stored with the same event is a duplicate; with a
  different event it is a SEQUENCE_CONFLICT, quarantined with its reason.
* The contiguous watermark (devices.ack_watermark), written in the same transaction as the
  rows it covers; quarantined rows with their reasons; the event_changes feed.

Several replicas may write at once, so nothing is trusted from memory: each transaction first
locks the devices rows of its batches (in device order, so two replicas never deadlock), then
reads each device's stored high-water mark and watermark under that lock. A batch above the
mark, in order (the common case), needs no lookup; its rows, with every other such batch of the
group, go into events by one binary COPY, the fastest bulk path measured
(scripts/bench_pg_driver.py). The device lock is what makes COPY safe without ON CONFLICT: no
other transaction can add rows of a locked device, so rows above the mark cannot collide. The
per-person change counter (timeline_heads) is taken after every device lock, in person order.

No NOTIFY is sent here: a transaction with a pending NOTIFY takes an instance-wide lock at
commit, which would serialize every replica's ingest (docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Final

from pulsesync.server.bus import ROW_SEQ
from pulsesync.server.storage.postgres.pool import Connection, PostgresPool
from pulsesync.server.timeline.committer import (
    MAX_SEQ,
    Batch,
    ChangeRow,
    EventRow,
    QuarantineRow,
    Stored,
    Watermark,
    change_runs,
    classify,
)
from pulsesync.v1 import events_pb2

log = logging.getLogger(__name__)

# Events per transaction: as on SQLite, enough to share a commit among dozens of 500-event
# batches, small enough that a group's locks are held for well under a second.
MAX_GROUP_EVENTS: Final = 20_000
# Transactions in flight at once on one replica. PostgreSQL takes concurrent writers (unlike
# SQLite): two let one group's COPY run while the other waits for its commit's WAL flush.
DEFAULT_WORKERS: Final = 2
EVENT_COLUMNS: Final = ("user_id", "device_pk", "seq", "t_us", "kind", "body", "received_us")
QUARANTINE_COLUMNS: Final = (
    "user_id",
    "device_pk",
    "seq",
    "event_id",
    "reason",
    "detail",
    "received_us",
    "body",
)
CHANGE_COLUMNS: Final = ("user_id", "change_id", "device_pk", "seq_low", "seq_high", "commit_us")


class WriterClosed(RuntimeError):
    """The writer is stopping or stopped; the batch was not stored."""


@dataclass(slots=True)
class _Pending:
    batch: Batch
    future: asyncio.Future[Stored]


@dataclass(slots=True)
class _DeviceState:
    hwm: int  # the largest seq stored (0: none)
    mark: Watermark
    exists: bool = True
    group_seqs: dict[int, str] = field(default_factory=dict)  # seq -> event_id, this group


class PostgresEventWriter:
    """Commits validated batches into PostgreSQL, several batches per transaction."""

    def __init__(self, pool: PostgresPool, *, workers: int = DEFAULT_WORKERS) -> None:
        self._pool = pool
        self._workers = workers
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.commits = 0  # transactions committed (for tests and benchmarks)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name=f"pg-ingest-writer-{i}")
            for i in range(self._workers)
        ]

    async def stop(self) -> None:
        """Commit what is queued, then stop."""
        self._closed = True
        for _ in self._tasks:
            self._queue.put_nowait(None)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None and not item.future.done():
                item.future.set_exception(WriterClosed("the server is shutting down"))

    def submit(self, batch: Batch) -> asyncio.Future[Stored]:
        """Queue a batch; the future resolves once it is durably committed."""
        future: asyncio.Future[Stored] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_exception(WriterClosed("the server is shutting down"))
        else:
            self._queue.put_nowait(_Pending(batch, future))
        return future

    def forget_device(self, device_pk: int) -> None:
        """Nothing to forget: every transaction reads the device's marks under its lock."""

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            group = [first]
            size = first.batch.size
            stop = False
            while size < MAX_GROUP_EVENTS and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stop = True
                    break
                group.append(item)
                size += item.batch.size
            # Shielded: a stop() or a cancelled caller must not cut a commit in half; the
            # outcome of every batch is then known and answered.
            results = await asyncio.shield(self.commit_group([p.batch for p in group]))
            for pending, result in zip(group, results, strict=True):
                if pending.future.done():
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
            if stop:
                return

    async def commit_group(self, group: list[Batch]) -> list[Stored | BaseException]:
        """Store every batch of the group in one transaction (one by one if that fails)."""
        try:
            results = await self._commit(group)
        except Exception as e:
            if len(group) == 1:
                return [self._failed(group[0], e)]
            log.warning("group commit failed; retrying its batches one by one", exc_info=True)
            out: list[Stored | BaseException] = []
            for batch in group:
                try:
                    (stored,) = await self._commit([batch])
                except Exception as e1:
                    out.append(self._failed(batch, e1))
                else:
                    out.append(stored)
            return out
        return list(results)

    def _failed(self, batch: Batch, error: Exception) -> BaseException:
        log.error("could not store a batch of device %d", batch.device_pk, exc_info=error)
        return error

    async def _commit(self, group: list[Batch]) -> list[Stored]:
        async with self._pool.transaction() as conn:
            results = await _commit_in(conn, group)
        self.commits += 1
        return results


async def _commit_in(conn: Connection, group: list[Batch]) -> list[Stored]:
    states = await _lock_devices(conn, group)
    results: list[Stored] = []
    rows: list[EventRow] = []
    quarantine: list[QuarantineRow] = []
    changes: list[ChangeRow] = []
    offsets: dict[tuple[int, int], int] = {}
    for b in group:
        st = states[(b.user_id, b.device_pk)]
        if b.in_order and (not b.rows or b.rows[0][2] > st.hwm):
            rows.extend(b.rows)
            changes.extend(change_runs(b, [r[2] for r in b.rows]))
            stored = Stored(None, 0, [])
            if b.rows:
                st.hwm = b.rows[-1][2]
                if st.group_seqs:  # a slow-path batch of this device came earlier
                    st.group_seqs.update((r[2], _event_id(r)) for r in b.rows)
        else:
            stored = await _dedupe(conn, b, st, rows)
            assert stored.inserted is not None
            inserted = [b.rows[i] for i in stored.inserted]
            rows.extend(inserted)
            changes.extend(change_runs(b, sorted(r[2] for r in inserted)))
            for (seq, event_id, detail), i in zip(
                stored.conflicts, stored.conflicting, strict=True
            ):
                quarantine.append(
                    (
                        b.user_id,
                        b.device_pk,
                        seq,
                        event_id,
                        "SEQUENCE_CONFLICT",
                        detail,
                        b.received_us,
                        b.rows[i][5],
                    )
                )
            st.hwm = max([st.hwm, *(r[2] for r in inserted)])
        quarantine.extend(b.quarantine)
        st.mark.add(b)
        stored.watermark = st.mark.through
        if b.clock_offset_us is not None:
            offsets[(b.user_id, b.device_pk)] = b.clock_offset_us
        results.append(stored)
    if rows:
        await conn.copy_records_to_table("events", records=rows, columns=EVENT_COLUMNS)
    if quarantine:
        await conn.copy_records_to_table(
            "quarantine", records=quarantine, columns=QUARANTINE_COLUMNS
        )
    if changes:
        await _append_changes(conn, changes)
    keys = [k for k, st in states.items() if st.exists]
    if keys:
        await conn.execute(
            "UPDATE devices AS d SET ack_watermark = x.mark,"
            " clock_offset_us = coalesce(x.off, d.clock_offset_us)"
            " FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[])"
            " AS x(u, dev, mark, off)"
            " WHERE d.user_id = x.u AND d.device_pk = x.dev",
            [k[0] for k in keys],
            [k[1] for k in keys],
            [states[k].mark.through for k in keys],
            [offsets.get(k) for k in keys],
        )
    return results


async def _lock_devices(
    conn: Connection, group: list[Batch]
) -> dict[tuple[int, int], _DeviceState]:
    """Lock the group's devices (device order) and read their marks under the lock."""
    keys = sorted({(b.user_id, b.device_pk) for b in group}, key=lambda k: (k[1], k[0]))
    users = [k[0] for k in keys]
    devices = [k[1] for k in keys]
    locked = {
        (int(r["user_id"]), int(r["device_pk"])): int(r["ack_watermark"])
        for r in await conn.fetch(
            "SELECT d.user_id, d.device_pk, d.ack_watermark FROM devices AS d"
            " JOIN unnest($1::bigint[], $2::bigint[]) AS x(u, dev)"
            " ON d.user_id = x.u AND d.device_pk = x.dev"
            " ORDER BY d.device_pk FOR UPDATE OF d",
            users,
            devices,
        )
    }
    # Under the locks: each device's largest stored seq, and what is handled above its mark.
    marks = {k: locked.get(k, 0) for k in keys}
    hwm: dict[tuple[int, int], int] = {}
    above: dict[tuple[int, int], set[int]] = defaultdict(set)
    for r in await conn.fetch(
        "SELECT x.u, x.dev,"
        " (SELECT max(seq) FROM events e WHERE e.user_id = x.u AND e.device_pk = x.dev) AS hwm"
        " FROM unnest($1::bigint[], $2::bigint[]) AS x(u, dev)",
        users,
        devices,
    ):
        hwm[(int(r["u"]), int(r["dev"]))] = int(r["hwm"] or 0)
    for r in await conn.fetch(
        "SELECT x.u, x.dev, e.seq FROM unnest($1::bigint[], $2::bigint[], $3::bigint[])"
        " AS x(u, dev, mark) JOIN events e"
        " ON e.user_id = x.u AND e.device_pk = x.dev AND e.seq > x.mark"
        " UNION ALL"
        " SELECT x.u, x.dev, q.seq FROM unnest($1::bigint[], $2::bigint[], $3::bigint[])"
        " AS x(u, dev, mark) JOIN quarantine q"
        " ON q.user_id = x.u AND q.device_pk = x.dev AND q.seq > x.mark AND q.seq < $4",
        users,
        devices,
        [marks[k] for k in keys],
        MAX_SEQ,
    ):
        above[(int(r["u"]), int(r["dev"]))].add(int(r["seq"]))
    states: dict[tuple[int, int], _DeviceState] = {}
    for k in keys:
        mark = Watermark(marks[k], above.get(k, set()))
        while mark.through + 1 in mark.above:
            mark.through += 1
            mark.above.discard(mark.through)
        states[k] = _DeviceState(hwm[k], mark, exists=k in locked)
    return states


def _event_id(row: EventRow) -> str:
    return events_pb2.Event.FromString(row[5]).event_id


async def _dedupe(conn: Connection, b: Batch, st: _DeviceState, pending: list[EventRow]) -> Stored:
    """The slow path: some seqs are at or below the mark, or the batch is out of order.

    Rows of this group not yet copied are in `pending`; their event ids are looked up there."""
    if not st.group_seqs:
        st.group_seqs.update((r[2], _event_id(r)) for r in pending if r[1] == b.device_pk)
    below = sorted({r[2] for r in b.rows if r[2] <= st.hwm} - st.group_seqs.keys())
    stored: dict[int, str] = dict(st.group_seqs)
    if below:
        for r in await conn.fetch(
            "SELECT seq, body FROM events WHERE user_id = $1 AND device_pk = $2"
            " AND seq = ANY($3::bigint[])",
            b.user_id,
            b.device_pk,
            below,
        ):
            stored[int(r["seq"])] = events_pb2.Event.FromString(r["body"]).event_id
    result = classify(b, stored)
    assert result.inserted is not None  # classify lists the rows it inserts
    # This group's later batches of the device see what this one inserts.
    st.group_seqs.update((b.rows[i][ROW_SEQ], stored[b.rows[i][ROW_SEQ]]) for i in result.inserted)
    return result


async def _append_changes(conn: Connection, changes: list[ChangeRow]) -> None:
    """Append the change-feed rows, numbered per person in commit order (timeline_heads)."""
    per_user: dict[int, int] = defaultdict(int)
    for c in changes:
        per_user[c[0]] += 1
    users = sorted(per_user)
    heads = {
        int(r["user_id"]): int(r["last_change_id"])
        for r in await conn.fetch(
            "INSERT INTO timeline_heads AS h (user_id, last_change_id)"
            " SELECT * FROM unnest($1::bigint[], $2::bigint[]) ORDER BY 1"
            " ON CONFLICT (user_id) DO UPDATE"
            " SET last_change_id = h.last_change_id + excluded.last_change_id"
            " RETURNING user_id, last_change_id",
            users,
            [per_user[u] for u in users],
        )
    }
    next_id = {u: heads[u] - per_user[u] + 1 for u in users}
    records = []
    for user_id, device_pk, low, high, commit_us in changes:
        records.append((user_id, next_id[user_id], device_pk, low, high, commit_us))
        next_id[user_id] += 1
    await conn.copy_records_to_table("event_changes", records=records, columns=CHANGE_COLUMNS)


__all__ = ["MAX_GROUP_EVENTS", "PostgresEventWriter", "WriterClosed"]

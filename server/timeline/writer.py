"""Group commit: one task writes the pending batches of every stream in one transaction.

A durable commit costs an fsync; sharing it among all the batches that arrived while the
previous commit ran is what lets many devices ingest at the speed of the disk instead of at
one fsync per batch. The writer is also the only place that decides duplicates and sequence
conflicts, so its in-memory per-device high-water mark (the largest stored seq) is always
right for the rows it wrote: a batch entirely above the mark is inserted without any lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from dataclasses import dataclass, field
from typing import Final

import aiosqlite

from pulsesync.server.bus import CommittedRow
from pulsesync.server.storage.db import Database
from pulsesync.v1 import events_pb2

log = logging.getLogger(__name__)

# Events per transaction. A transaction holds the write lock while it runs: ~20k rows is
# ~0.1-0.2 s of SQLite work, which bounds the ack latency a burst can add while still
# sharing each fsync among dozens of 500-event batches.
MAX_GROUP_EVENTS: Final = 20_000
# Page cache of the write connection, in KiB (negative = KiB for SQLite). A group of 20k rows
# dirties a few MiB of b-tree pages; the 2 MiB default spills them to the WAL mid-transaction.
WRITER_CACHE_KIB: Final = 64 * 1024
# SQLite's default limit on host parameters is 32766; lookups use far fewer per statement.
_LOOKUP_CHUNK: Final = 500

# (user_id, device_pk, seq, t_us, kind, body, received_us): the INSERT's columns and the
# fields of the CommittedEvent published after the commit, so one plain tuple serves both.
EventRow = CommittedRow
# (user_id, device_pk, seq, event_id, reason, detail, received_us, body)
QuarantineRow = tuple[int, int, int, str, str, str, int, bytes]

INSERT_EVENTS: Final = (
    "INSERT INTO events (user_id, device_pk, seq, t_us, kind, body, received_us)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
# Rows per multi-row INSERT statement (7 values each, well under SQLite's 32766 variables).
# One statement steps through all its rows with the GIL released, where executemany releases
# and re-takes the GIL around every row: while the event loop validates the next batches, a
# per-row hand-off leaves the writer thread waiting for the GIL most of the time.
INSERT_CHUNK: Final = 250
_INSERT_EVENTS_PREFIX: Final = INSERT_EVENTS.split(" VALUES ")[0] + " VALUES "
INSERT_QUARANTINE: Final = (
    "INSERT INTO quarantine (user_id, device_pk, seq, event_id, reason, detail, received_us, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True, slots=True)
class Conflict:
    """An event whose seq already holds a different event: quarantined, not stored."""

    seq: int
    event_id: str
    detail: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the commit did with a batch's valid events."""

    inserted: list[EventRow]
    duplicates: int
    conflicts: list[Conflict]


@dataclass(slots=True)
class PendingBatch:
    """A validated batch waiting for the writer."""

    device_pk: int
    user_id: int
    received_us: int
    rows: list[EventRow]
    event_ids: list[str]  # parallel to rows
    quarantine: list[QuarantineRow]
    in_order: bool  # rows' seqs strictly increase
    clock_offset_us: int | None  # persist to devices.clock_offset_us when set
    future: asyncio.Future[Outcome] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def size(self) -> int:
        return len(self.rows) + len(self.quarantine) + 1


class WriterClosed(RuntimeError):
    """The writer is stopping; the batch was not stored."""


class GroupCommitWriter:
    """Serializes all ingest writes through one task and shares commits between batches."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._queue: asyncio.Queue[PendingBatch] = asyncio.Queue()
        self._hwm: dict[int, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.commits = 0  # transactions committed (for tests and benchmarks)

    async def start(self) -> None:
        """Size the write connection's page cache and start the writer task."""
        await self._db.writer.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
        self._task = asyncio.create_task(self._run(), name="ingest-writer")

    async def stop(self) -> None:
        """Commit what is queued, then stop."""
        self._closed = True
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(WriterClosed("the server is shutting down"))

    def submit(self, batch: PendingBatch) -> asyncio.Future[Outcome]:
        """Queue a batch; the future resolves once it is durably committed."""
        if self._closed:
            batch.future.set_exception(WriterClosed("the server is shutting down"))
        else:
            self._queue.put_nowait(batch)
        return batch.future

    def forget_device(self, device_pk: int) -> None:
        """Drop the cached high-water mark (after the device's rows were deleted)."""
        self._hwm.pop(device_pk, None)

    async def _run(self) -> None:
        while True:
            group = [await self._queue.get()]
            size = group[0].size
            while size < MAX_GROUP_EVENTS and not self._queue.empty():
                batch = self._queue.get_nowait()
                group.append(batch)
                size += batch.size
            try:
                await self._commit_group(group)
            finally:
                for _ in group:
                    self._queue.task_done()

    async def _commit_group(self, group: list[PendingBatch]) -> None:
        try:
            outcomes = await self._commit(group)
        except Exception:
            if len(group) == 1:
                self._fail(group[0])
                return
            # One bad batch must not sink the others: retry them one by one.
            log.warning("group commit failed; retrying its batches one by one", exc_info=True)
            for batch in group:
                try:
                    (outcome,) = await self._commit([batch])
                except Exception:
                    self._fail(batch)
                else:
                    _resolve(batch, outcome)
            return
        for batch, outcome in zip(group, outcomes, strict=True):
            _resolve(batch, outcome)

    def _fail(self, batch: PendingBatch) -> None:
        log.exception("could not store a batch", extra={"device_pk": batch.device_pk})
        self._hwm.pop(batch.device_pk, None)
        if not batch.future.done():
            batch.future.set_exception(RuntimeError("storing the batch failed"))

    async def _commit(self, group: list[PendingBatch]) -> list[Outcome]:
        tentative: dict[int, int] = {}
        outcomes: list[Outcome] = []
        rows: list[EventRow] = []
        quarantine: list[QuarantineRow] = []
        offsets: dict[int, int] = {}
        async with self._db.transaction() as tx:
            for b in group:
                dev = b.device_pk
                hwm = tentative.get(dev)
                if hwm is None:
                    hwm = self._hwm.get(dev)
                    if hwm is None:
                        hwm = await _load_hwm(tx, dev)
                if b.in_order and (not b.rows or b.rows[0][2] > hwm):
                    rows.extend(b.rows)
                    outcomes.append(Outcome(b.rows, 0, []))
                    if b.rows:
                        hwm = b.rows[-1][2]
                else:
                    # Lookups must see this group's earlier rows: write them first.
                    if rows:
                        await insert_events(tx, rows)
                        rows = []
                    outcome = await _dedupe(tx, b, hwm)
                    rows.extend(outcome.inserted)
                    outcomes.append(outcome)
                    quarantine.extend(
                        (
                            b.user_id,
                            dev,
                            c.seq,
                            c.event_id,
                            "SEQUENCE_CONFLICT",
                            c.detail,
                            b.received_us,
                            body,
                        )
                        for c, body in _conflict_bodies(b, outcome)
                    )
                    hwm = max([hwm, *(r[2] for r in outcome.inserted)])
                tentative[dev] = hwm
                quarantine.extend(b.quarantine)
                if b.clock_offset_us is not None:
                    offsets[dev] = b.clock_offset_us
            if rows:
                await insert_events(tx, rows)
            if quarantine:
                await tx.executemany(INSERT_QUARANTINE, quarantine)
            if offsets:
                await tx.executemany(
                    "UPDATE devices SET clock_offset_us = ? WHERE device_pk = ?",
                    [(off, dev) for dev, off in offsets.items()],
                )
        self.commits += 1
        self._hwm.update(tentative)
        return outcomes


@functools.cache
def _insert_many_sql(n: int) -> str:
    return _INSERT_EVENTS_PREFIX + ",".join(["(?,?,?,?,?,?,?)"] * n)


async def insert_events(tx: aiosqlite.Connection, rows: list[EventRow]) -> None:
    """INSERT rows into events, INSERT_CHUNK rows per statement."""
    for i in range(0, len(rows), INSERT_CHUNK):
        chunk = rows[i : i + INSERT_CHUNK]
        await tx.execute(_insert_many_sql(len(chunk)), list(itertools.chain.from_iterable(chunk)))


def _resolve(batch: PendingBatch, outcome: Outcome) -> None:
    if not batch.future.done():
        batch.future.set_result(outcome)


async def _load_hwm(tx: aiosqlite.Connection, device_pk: int) -> int:
    async with tx.execute("SELECT max(seq) FROM events WHERE device_pk = ?", (device_pk,)) as c:
        row = await c.fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0


async def _dedupe(tx: aiosqlite.Connection, b: PendingBatch, hwm: int) -> Outcome:
    """The slow path: some seqs are at or below the mark, or the batch is out of order."""
    below = sorted({r[2] for r in b.rows if r[2] <= hwm})
    stored: dict[int, str] = {}
    for i in range(0, len(below), _LOOKUP_CHUNK):
        chunk = below[i : i + _LOOKUP_CHUNK]
        async with tx.execute(
            f"SELECT seq, body FROM events WHERE device_pk = ? AND seq IN ({','.join('?' * len(chunk))})",
            (b.device_pk, *chunk),
        ) as c:
            for seq, body in await c.fetchall():
                stored[int(seq)] = events_pb2.Event.FromString(body).event_id
    inserted: list[EventRow] = []
    duplicates = 0
    conflicts: list[Conflict] = []
    for row, event_id in zip(b.rows, b.event_ids, strict=True):
        seq = row[2]
        prior = stored.get(seq)
        if prior is None:
            inserted.append(row)
            stored[seq] = event_id
        elif prior == event_id:
            duplicates += 1
        else:
            conflicts.append(
                Conflict(
                    seq,
                    event_id,
                    f"seq {seq} already holds event {prior!r}; seqs must not be reused",
                )
            )
    inserted.sort(key=lambda r: r[2])
    return Outcome(inserted, duplicates, conflicts)


def _conflict_bodies(b: PendingBatch, outcome: Outcome) -> list[tuple[Conflict, bytes]]:
    if not outcome.conflicts:
        return []
    body_of = {(r[2], eid): r[5] for r, eid in zip(b.rows, b.event_ids, strict=True)}
    return [(c, body_of[(c.seq, c.event_id)]) for c in outcome.conflicts]

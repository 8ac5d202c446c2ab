"""Group commit: one thread writes the pending batches of every stream in one transaction.

A durable commit costs an fsync; sharing it among all the batches that arrived while the
previous commit ran is what lets many devices ingest at the speed of the disk instead of at
one fsync per batch. The writer is also the only place that decides duplicates and sequence
conflicts, so its in-memory per-device high-water mark (the largest stored seq) is always
right for the rows it wrote: a batch entirely above the mark is inserted without any lookup.

The writer is a thread with its own SQLite connection that runs a whole group (BEGIN, the
inserts, COMMIT) in one go. Driving the statements from the event loop instead (one await per
statement on the shared aiosqlite connection) made every statement wait for the loop to come
round, behind the validation of other batches: the disk sat idle while the loop was busy,
and the loop while the disk was. Other writers (devices, consent, erasure) keep using
`Database.transaction()`; the writer lets them go first (see `_commit`).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Final

from pulsesync.server.bus import CommittedRow
from pulsesync.server.storage.db import BUSY_TIMEOUT_MS, Database
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
# How often the writer thread looks whether another writer's transaction has ended: well
# under the ~1 ms such a transaction takes.
OTHER_WRITER_POLL_S: Final = 0.0002
# How long stop() waits for the queued batches to be committed.
STOP_TIMEOUT_S: Final = 10.0

# (user_id, device_pk, seq, t_us, kind, body, received_us): the INSERT's columns and the
# fields of the CommittedEvent published after the commit, so one plain tuple serves both.
EventRow = CommittedRow
# (user_id, device_pk, seq, event_id, reason, detail, received_us, body)
QuarantineRow = tuple[int, int, int, str, str, str, int, bytes]

INSERT_EVENTS: Final = (
    "INSERT INTO events (user_id, device_pk, seq, t_us, kind, body, received_us)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
# Rows per multi-row INSERT statement: 7 values each, 28,000 in all, under SQLite's limit of
# 32,766 host parameters. One statement steps through all its rows with the GIL released,
# where executemany releases and re-takes the GIL around every row. Each statement ends with
# the writer thread asking for the GIL back while the event loop validates other batches;
# 4000 rows make that once for a typical group.
INSERT_CHUNK: Final = 4000
# The interpreter's GIL switch interval while the writer runs. A thread that wants the GIL
# back from a busy thread waits this long before the holder is asked to yield; the default
# 5 ms is longer than SQLite needs for a 4000-row statement or a commit, so the writer thread
# would wait for the event loop more than it works. 0.5 ms keeps it working.
GIL_SWITCH_INTERVAL_S: Final = 0.0005
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


# What the writer thread hands back to the event loop for one batch.
_Result = tuple[PendingBatch, "Outcome | BaseException"]


class GroupCommitWriter:
    """Serializes all ingest writes through one thread and shares commits between batches."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._incoming: list[PendingBatch] = []  # submitted during this loop iteration
        self._handoff_due = False
        self._queue: collections.deque[PendingBatch] = collections.deque()  # for the thread
        self._ready = threading.Condition()
        self._stopping = False
        self._hwm: dict[int, int] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._switch_interval: float | None = None  # the interpreter's, to restore
        self.commits = 0  # transactions committed (for tests and benchmarks)

    async def start(self) -> None:
        """Open the writer's own connection and start its thread."""
        self._loop = asyncio.get_running_loop()
        conn = await asyncio.to_thread(_connect, str(self._db.path))
        self._thread = threading.Thread(
            target=self._run, args=(conn,), name="ingest-writer", daemon=True
        )
        self._thread.start()
        interval = sys.getswitchinterval()
        if interval > GIL_SWITCH_INTERVAL_S:
            self._switch_interval = interval
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)

    async def stop(self) -> None:
        """Commit what is queued, then stop."""
        self._closed = True
        if self._thread is None:
            return
        self._handoff()
        with self._ready:
            self._stopping = True
            self._ready.notify()
        await asyncio.to_thread(self._thread.join, STOP_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("the ingest writer did not finish its queue in time")
        with self._ready:
            left = list(self._queue)
            self._queue.clear()
        for pending in left:
            if not pending.future.done():
                pending.future.set_exception(WriterClosed("the server is shutting down"))
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None

    def submit(self, batch: PendingBatch) -> asyncio.Future[Outcome]:
        """Queue a batch; the future resolves once it is durably committed."""
        if self._closed or self._loop is None:
            batch.future.set_exception(WriterClosed("the server is shutting down"))
            return batch.future
        self._incoming.append(batch)
        if not self._handoff_due:
            # One hand-off per loop iteration: batches submitted together reach the thread
            # together (and share a commit), and the thread is woken once for them.
            self._handoff_due = True
            self._loop.call_soon(self._handoff)
        return batch.future

    def forget_device(self, device_pk: int) -> None:
        """Drop the cached high-water mark (after the device's rows were deleted)."""
        self._hwm.pop(device_pk, None)

    def _handoff(self) -> None:
        self._handoff_due = False
        if not self._incoming:
            return
        with self._ready:
            self._queue.extend(self._incoming)
            self._ready.notify()
        self._incoming = []

    # -- the writer thread ----------------------------------------------------------------
    def _run(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                with self._ready:
                    while not self._queue and not self._stopping:
                        self._ready.wait()
                    if not self._queue:
                        return
                    group = [self._queue.popleft()]
                    size = group[0].size
                    while size < MAX_GROUP_EVENTS and self._queue:
                        batch = self._queue.popleft()
                        group.append(batch)
                        size += batch.size
                results = self._commit_group(conn, group)
                assert self._loop is not None
                try:
                    self._loop.call_soon_threadsafe(_resolve_all, results)
                except RuntimeError:  # the loop is closed: nobody waits for these any more
                    return
        finally:
            conn.close()

    def _commit_group(self, conn: sqlite3.Connection, group: list[PendingBatch]) -> list[_Result]:
        try:
            outcomes = self._commit(conn, group)
        except Exception as e:
            if len(group) == 1:
                return [(group[0], self._fail(group[0], e))]
            # One bad batch must not sink the others: retry them one by one.
            log.warning("group commit failed; retrying its batches one by one", exc_info=True)
            results: list[_Result] = []
            for batch in group:
                try:
                    (outcome,) = self._commit(conn, [batch])
                except Exception as e1:
                    results.append((batch, self._fail(batch, e1)))
                else:
                    results.append((batch, outcome))
            return results
        return list(zip(group, outcomes, strict=True))

    def _fail(self, batch: PendingBatch, error: Exception) -> BaseException:
        log.error("could not store a batch", extra={"device_pk": batch.device_pk}, exc_info=error)
        self._hwm.pop(batch.device_pk, None)
        return RuntimeError("storing the batch failed")

    def _commit(self, conn: sqlite3.Connection, group: list[PendingBatch]) -> list[Outcome]:
        tentative: dict[int, int] = {}
        outcomes: list[Outcome] = []
        rows: list[EventRow] = []
        quarantine: list[QuarantineRow] = []
        offsets: dict[int, int] = {}
        # Other writers (profiles, consent, devices, erasure) hold the database's write lock
        # for the length of their transaction: let them go first. Waiting here in short naps
        # rather than in BEGIN keeps them from being starved by a stream of groups (SQLite's
        # busy handler sleeps 1, 2, 5... ms and would rarely find the lock free between two
        # groups) and keeps the writer from oversleeping behind them.
        lock = self._db.write_lock
        while lock.locked():
            time.sleep(OTHER_WRITER_POLL_S)
        conn.execute("BEGIN IMMEDIATE")
        try:
            for b in group:
                dev = b.device_pk
                hwm = tentative.get(dev)
                if hwm is None:
                    hwm = self._hwm.get(dev)
                    if hwm is None:
                        hwm = _load_hwm(conn, dev)
                if b.in_order and (not b.rows or b.rows[0][2] > hwm):
                    rows.extend(b.rows)
                    outcomes.append(Outcome(b.rows, 0, []))
                    if b.rows:
                        hwm = b.rows[-1][2]
                else:
                    # Lookups must see this group's earlier rows: write them first.
                    if rows:
                        insert_events(conn, rows)
                        rows = []
                    outcome = _dedupe(conn, b, hwm)
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
                insert_events(conn, rows)
            if quarantine:
                conn.executemany(INSERT_QUARANTINE, quarantine)
            if offsets:
                conn.executemany(
                    "UPDATE devices SET clock_offset_us = ? WHERE device_pk = ?",
                    [(off, dev) for dev, off in offsets.items()],
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.commits += 1
        self._hwm.update(tentative)
        return outcomes


def _connect(path: str) -> sqlite3.Connection:
    """The writer thread's connection: durable commits, a page cache sized for a group."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
    except BaseException:
        conn.close()
        raise
    return conn


def _resolve_all(results: list[_Result]) -> None:
    for batch, result in results:
        if batch.future.done():
            continue
        if isinstance(result, BaseException):
            batch.future.set_exception(result)
        else:
            batch.future.set_result(result)


@functools.cache
def _insert_many_sql(n: int) -> str:
    return _INSERT_EVENTS_PREFIX + ",".join(["(?,?,?,?,?,?,?)"] * n)


def insert_events(conn: sqlite3.Connection, rows: list[EventRow]) -> None:
    """INSERT rows into events, INSERT_CHUNK rows per statement."""
    for i in range(0, len(rows), INSERT_CHUNK):
        chunk = rows[i : i + INSERT_CHUNK]
        conn.execute(_insert_many_sql(len(chunk)), list(itertools.chain.from_iterable(chunk)))


def _load_hwm(conn: sqlite3.Connection, device_pk: int) -> int:
    row = conn.execute("SELECT max(seq) FROM events WHERE device_pk = ?", (device_pk,)).fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0


def _dedupe(conn: sqlite3.Connection, b: PendingBatch, hwm: int) -> Outcome:
    """The slow path: some seqs are at or below the mark, or the batch is out of order."""
    below = sorted({r[2] for r in b.rows if r[2] <= hwm})
    stored: dict[int, str] = {}
    for i in range(0, len(below), _LOOKUP_CHUNK):
        chunk = below[i : i + _LOOKUP_CHUNK]
        for seq, body in conn.execute(
            f"SELECT seq, body FROM events WHERE device_pk = ? AND seq IN ({','.join('?' * len(chunk))})",
            (b.device_pk, *chunk),
        ):
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

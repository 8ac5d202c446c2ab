"""The ingest writer process: group commit of validated batches into SQLite.

    python -m pulsesync.server.timeline.committer DB_PATH CONTROL_FD BUSY_TIMEOUT_MS LOG_FORMAT [HOOK]

The server starts this process (see writer.GroupCommitWriter) and talks to it over pipes:

* stdin carries framed requests, in order: `("batch", token, device_pk, user_id,
  received_us, rows, quarantine, in_order, clock_offset_us)` and
  `("forget", device_pk)` (the device's rows were erased: drop its cached high-water mark);
* stdout carries one framed reply per transaction: `(commits, results)`, a result being
  `(token, inserted, duplicates, conflicts, derived, watermark)` or `(token, error_message,
  sqlite_code)` (SQLite's primary result code, 0 for another failure), where `inserted` is None
  when every row was inserted, else the indexes of the inserted rows, and `derived` is what the
  commit hook made of those rows (None without a hook);
* CONTROL_FD is a pipe on which the server writes b"1" while one of its own transactions
  (profiles, consent, devices, erasure) holds the database and b"0" after: the writer lets
  those go first instead of leaving them to SQLite's busy handler, which sleeps 1, 2, 5... ms
  and would rarely find the lock free between two groups.

A frame is a 4-byte little-endian length and a `marshal` payload: the fastest serializer of
tuples of ints, strings and bytes that the standard library has, and both ends are the same
Python. Closing stdin stops the process once everything queued is committed.

Why a process: a durable commit (`sqlite3` binding ~7 parameters per row, the b-tree inserts,
the WAL write and fsync) is the largest share of ingest's CPU after validation. In a thread it
competes with the event loop for the GIL; in its own process it runs beside it, and the loop
pays only for marshalling the rows (~0.06 us each).

A durable commit costs an fsync; sharing it among all the batches that arrived while the
previous commit ran is what lets many devices ingest at the speed of the disk instead of at
one fsync per batch. The writer is also the only place that decides duplicates and sequence
conflicts, so its in-memory per-device high-water mark (the largest stored seq) is always
right for the rows it wrote: a batch entirely above the mark is inserted without any lookup.
It also keeps each device's ack watermark (`Watermark`): the highest seq with every seq at or
below it stored, quarantined or refused for good. It is written to devices.ack_watermark in
the same transaction as the rows, and each batch's reply carries it, so an ack never covers a
seq the server has not received, nor one that is not yet durable.

The commit hook: HOOK names a function ("package.module:function") that the process calls on
each batch's inserted rows right after the commit, `hook(rows, device_pk)`, returning anything
`marshal` carries. Its result travels with the batch's answer and onto the server's event bus
(`CommittedBatch.derived`), so a consumer can move per-row work off the event loop onto this
process's core without the writer knowing about it; the composition root chooses the hook.

At startup this module imports the standard library, the row type of `bus`, the log format of
`logs`, and the hook's module (~15 ms with the event protobufs), so that the process starts
fast. LOG_FORMAT is the server's: "json" (one JSON object per line, as `pulsesync serve` logs)
or "text".
"""

from __future__ import annotations

import functools
import importlib
import itertools
import logging
import marshal
import os
import queue
import signal
import sqlite3
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import IO, Any, Final

from pulsesync.server.bus import ROW_BODY, ROW_SEQ, CommittedRow
from pulsesync.server.logs import setup_logging
from pulsesync.v1 import events_pb2

log = logging.getLogger("pulsesync.server.timeline.committer")

# What a commit hook is given (a batch's inserted rows and its device) and returns.
CommitHook = Callable[[Sequence[CommittedRow], int], Any]

# Events per transaction. A transaction holds the write lock while it runs: ~20k rows is
# ~0.1-0.2 s of SQLite work, which bounds the ack latency a burst can add while still
# sharing each fsync among dozens of 500-event batches.
MAX_GROUP_EVENTS: Final = 20_000
# Page cache of the write connection, in KiB (negative = KiB for SQLite). A group of 20k rows
# dirties a few MiB of b-tree pages; the 2 MiB default spills them to the WAL mid-transaction.
WRITER_CACHE_KIB: Final = 64 * 1024
# SQLite's default limit on host parameters is 32766; lookups use far fewer per statement.
_LOOKUP_CHUNK: Final = 500
# Rows per multi-row INSERT statement: 7 values each, 28,000 in all, under SQLite's limit of
# 32,766 host parameters. One statement binds all its rows and steps through them at once.
INSERT_CHUNK: Final = 4000
INSERT_EVENTS: Final = (
    "INSERT INTO events (user_id, device_pk, seq, t_us, kind, body, received_us)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_EVENTS_PREFIX: Final = INSERT_EVENTS.split(" VALUES ")[0] + " VALUES "
INSERT_QUARANTINE: Final = (
    "INSERT INTO quarantine (user_id, device_pk, seq, event_id, reason, detail, received_us, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
# A pipe that holds several 500-event batches (~60 KiB each) lets a group form in one read.
PIPE_BYTES: Final = 1 << 20
_F_SETPIPE_SZ: Final = 1031  # Linux fcntl; elsewhere pipes keep their size
_LENGTH: Final = struct.Struct("<I")
# The largest valid seq; a quarantined row holds it for a seq beyond it (SEQ_TOO_LARGE), so it
# never counts towards the watermark.
MAX_SEQ: Final = 2**63 - 1

# (user_id, device_pk, seq, t_us, kind, body, received_us): the INSERT's columns and the
# fields of the CommittedEvent published after the commit, so one plain tuple serves both.
EventRow = CommittedRow
# (user_id, device_pk, seq, event_id, reason, detail, received_us, body)
QuarantineRow = tuple[int, int, int, str, str, str, int, bytes]
_Q_SEQ: Final = 2  # a QuarantineRow's seq
_SEQ_OF: Final = itemgetter(ROW_SEQ)  # a row's seq, in one C-level pass over a batch
# (user_id, device_pk, seq_low, seq_high, commit_us): a run of consecutive seqs one commit
# inserted, for the timeline's change feed (0008_event_changes.sql).
ChangeRow = tuple[int, int, int, int, int]
INSERT_CHANGES: Final = (
    "INSERT INTO event_changes (user_id, device_pk, seq_low, seq_high, commit_us)"
    " VALUES (?, ?, ?, ?, ?)"
)
# (seq, event_id, detail) of an event whose seq already holds a different event.
ConflictRow = tuple[int, str, str]


@dataclass(slots=True)
class Batch:
    """A validated batch: what the server sends the writer (after a token naming it)."""

    device_pk: int
    user_id: int
    received_us: int
    rows: list[EventRow]
    quarantine: list[QuarantineRow]
    in_order: bool  # rows' seqs strictly increase
    clock_offset_us: int | None  # persist to devices.clock_offset_us when set
    # Seqs refused for good without a row (consent not granted): they count as handled.
    settled: list[int] = field(default_factory=list)

    def fields(self) -> tuple[Any, ...]:
        """The fields in order, for the wire (`Batch(*fields)` on the other side)."""
        return (
            self.device_pk,
            self.user_id,
            self.received_us,
            self.rows,
            self.quarantine,
            self.in_order,
            self.clock_offset_us,
            self.settled,
        )

    @property
    def size(self) -> int:
        return len(self.rows) + len(self.quarantine) + 1


@dataclass(slots=True)
class Stored:
    """What the commit did with a batch's rows."""

    inserted: list[int] | None  # indexes into Batch.rows; None: all of them
    duplicates: int
    conflicts: list[ConflictRow]
    conflicting: list[int] = field(default_factory=list)  # their indexes into Batch.rows
    watermark: int = 0  # the device's contiguous ack watermark once this batch is committed


@dataclass(slots=True)
class Watermark:
    """A device's contiguous ack watermark: every seq at or below `through` is handled (stored,
    quarantined or refused for good); `above` holds the handled seqs past it, waiting for the
    gap below them to be filled."""

    through: int
    above: set[int] = field(default_factory=set)

    def copy(self) -> Watermark:
        return Watermark(self.through, set(self.above))

    def add(self, b: Batch) -> None:
        """Count every seq of the batch as handled and advance over what is now contiguous."""
        rows = b.rows
        n = len(rows)
        # The common case: an in-order batch that continues the mark with no gap.
        if (
            not self.above
            and not b.quarantine
            and not b.settled
            and b.in_order
            and n
            and rows[0][ROW_SEQ] == self.through + 1
            and rows[-1][ROW_SEQ] - rows[0][ROW_SEQ] == n - 1
        ):
            self.through = rows[-1][ROW_SEQ]
            return
        through = self.through
        above = self.above
        above.update(r[ROW_SEQ] for r in rows if r[ROW_SEQ] > through)
        above.update(q[_Q_SEQ] for q in b.quarantine if through < q[_Q_SEQ] < MAX_SEQ)
        above.update(s for s in b.settled if through < s < MAX_SEQ)
        while through + 1 in above:
            through += 1
            above.discard(through)
        self.through = through


# -- framing ----------------------------------------------------------------------------------
def frame(message: Any) -> bytes:
    payload = marshal.dumps(message)
    return _LENGTH.pack(len(payload)) + payload


def unframe(payload: bytes) -> Any:
    """The message of a frame's payload (the bytes after its length)."""
    return marshal.loads(payload)


def read_frame(stream: IO[bytes]) -> Any:
    """The next message, or None at the end of the stream."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (n,) = _LENGTH.unpack(head)
    payload = stream.read(n)
    if len(payload) < n:
        return None
    return unframe(payload)


def widen_pipe(fd: int) -> None:
    """Ask for a PIPE_BYTES pipe buffer where the system allows it."""
    try:
        import fcntl

        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, OSError):
        pass


# -- the commit -------------------------------------------------------------------------------
def connect(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    """The writer's connection: durable commits, a page cache sized for a group."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
    except BaseException:
        conn.close()
        raise
    return conn


class Committer:
    """Commits groups of batches on one connection; keeps each device's high-water mark."""

    def __init__(self, conn: sqlite3.Connection, *, wait_turn: Any = None) -> None:
        self.conn = conn
        self.commits = 0
        self._hwm: dict[int, int] = {}
        self._marks: dict[int, Watermark] = {}
        # Set when SQLite reports the file damaged: nothing more is written to it.
        self.damaged: BaseException | None = None
        # Called before each BEGIN: returns once the server's own writers are done.
        self._wait_turn = wait_turn or (lambda: None)

    def forget(self, device_pk: int) -> None:
        self._hwm.pop(device_pk, None)
        self._marks.pop(device_pk, None)

    def commit_group(self, group: list[Batch]) -> list[Stored | BaseException]:
        """Store every batch of the group in one transaction (one by one if that fails)."""
        if self.damaged is not None:
            return [self.damaged for _ in group]
        try:
            return list(self._commit(group))
        except Exception as e:
            if len(group) == 1:
                return [self._failed(group[0], e)]
            # One bad batch must not sink the others: retry them one by one.
            log.warning("group commit failed; retrying its batches one by one", exc_info=True)
            results: list[Stored | BaseException] = []
            for batch in group:
                if self.damaged is not None:
                    results.append(self.damaged)
                    continue
                try:
                    (stored,) = self._commit([batch])
                except Exception as e1:
                    results.append(self._failed(batch, e1))
                else:
                    results.append(stored)
            return results

    def _failed(self, batch: Batch, error: Exception) -> BaseException:
        log.error("could not store a batch of device %d", batch.device_pk, exc_info=error)
        if error_code(error) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            self.damaged = error
        self._hwm.pop(batch.device_pk, None)
        self._marks.pop(batch.device_pk, None)
        return error

    def _commit(self, group: list[Batch]) -> list[Stored]:
        conn = self.conn
        tentative: dict[int, int] = {}
        marks: dict[int, Watermark] = {}
        results: list[Stored] = []
        rows: list[EventRow] = []
        quarantine: list[QuarantineRow] = []
        offsets: dict[int, int] = {}
        changes: list[ChangeRow] = []
        self._wait_turn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for b in group:
                dev = b.device_pk
                hwm = tentative.get(dev)
                if hwm is None:
                    hwm = self._hwm.get(dev)
                    if hwm is None:
                        hwm = _load_hwm(conn, dev)
                if b.in_order and (not b.rows or b.rows[0][ROW_SEQ] > hwm):
                    rows.extend(b.rows)
                    changes.extend(change_runs(b, list(map(_SEQ_OF, b.rows))))
                    results.append(Stored(None, 0, []))
                    if b.rows:
                        hwm = b.rows[-1][ROW_SEQ]
                else:
                    # Lookups must see this group's earlier rows: write them first.
                    if rows:
                        insert_events(conn, rows)
                        rows = []
                    stored = _dedupe(conn, b, hwm)
                    assert stored.inserted is not None
                    inserted = [b.rows[i] for i in stored.inserted]
                    rows.extend(inserted)
                    changes.extend(change_runs(b, sorted(r[ROW_SEQ] for r in inserted)))
                    results.append(stored)
                    quarantine.extend(
                        (
                            b.user_id,
                            dev,
                            seq,
                            event_id,
                            "SEQUENCE_CONFLICT",
                            detail,
                            b.received_us,
                            b.rows[i][ROW_BODY],
                        )
                        for (seq, event_id, detail), i in zip(
                            stored.conflicts, stored.conflicting, strict=True
                        )
                    )
                    hwm = max([hwm, *(r[ROW_SEQ] for r in inserted)])
                tentative[dev] = hwm
                quarantine.extend(b.quarantine)
                mark = marks.get(dev)
                if mark is None:
                    known = self._marks.get(dev)
                    mark = marks[dev] = known.copy() if known else _load_mark(conn, b)
                mark.add(b)
                results[-1].watermark = mark.through
                if b.clock_offset_us is not None:
                    offsets[dev] = b.clock_offset_us
            if rows:
                insert_events(conn, rows)
            if quarantine:
                conn.executemany(INSERT_QUARANTINE, quarantine)
            if changes:
                conn.executemany(INSERT_CHANGES, changes)
            if offsets:
                conn.executemany(
                    "UPDATE devices SET clock_offset_us = ? WHERE device_pk = ?",
                    [(off, dev) for dev, off in offsets.items()],
                )
            if marks:
                conn.executemany(
                    "UPDATE devices SET ack_watermark = ? WHERE device_pk = ?",
                    [(m.through, dev) for dev, m in marks.items()],
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.commits += 1
        self._hwm.update(tentative)
        self._marks.update(marks)
        return results


def error_code(e: BaseException) -> int:
    """SQLite's primary result code for e (0 if it is not SQLite's): the server tells a full
    disk and a damaged file from other failures by it."""
    code = getattr(e, "sqlite_errorcode", None) if isinstance(e, sqlite3.Error) else None
    return int(code) & 0xFF if code is not None else 0


def change_runs(b: Batch, seqs: list[int]) -> list[ChangeRow]:
    """The runs of consecutive seqs (ascending) a batch inserted, as change-feed rows."""
    out: list[ChangeRow] = []
    if not seqs:
        return out
    low = prev = seqs[0]
    for seq in seqs[1:]:
        if seq != prev + 1:
            out.append((b.user_id, b.device_pk, low, prev, b.received_us))
            low = seq
        prev = seq
    out.append((b.user_id, b.device_pk, low, prev, b.received_us))
    return out


@functools.cache
def _insert_many_sql(n: int) -> str:
    return _INSERT_EVENTS_PREFIX + ",".join(["(?,?,?,?,?,?,?)"] * n)


def insert_events(conn: sqlite3.Connection, rows: list[EventRow]) -> None:
    """INSERT rows into events, INSERT_CHUNK rows per statement."""
    for i in range(0, len(rows), INSERT_CHUNK):
        chunk = rows[i : i + INSERT_CHUNK]
        params: list[Any] = list(itertools.chain.from_iterable(chunk))
        # sqlite3 binds int, float, str and bytearray directly but looks a bytes value up in
        # its adapter registry first (~0.2 us each); a bytearray copy of the body is cheaper.
        params[5::7] = map(bytearray, params[5::7])
        conn.execute(_insert_many_sql(len(chunk)), params)


def _load_hwm(conn: sqlite3.Connection, device_pk: int) -> int:
    row = conn.execute("SELECT max(seq) FROM events WHERE device_pk = ?", (device_pk,)).fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0


def _load_mark(conn: sqlite3.Connection, b: Batch) -> Watermark:
    """A device's watermark as committed, with the stored and quarantined seqs above it."""
    row = conn.execute(
        "SELECT ack_watermark FROM devices WHERE device_pk = ?", (b.device_pk,)
    ).fetchone()
    mark = Watermark(int(row[0]) if row is not None else 0)
    above = mark.above
    above.update(
        int(r[0])
        for r in conn.execute(
            "SELECT seq FROM events WHERE device_pk = ? AND seq > ?", (b.device_pk, mark.through)
        )
    )
    above.update(
        int(r[0])
        for r in conn.execute(
            "SELECT seq FROM quarantine WHERE user_id = ? AND device_pk = ? AND seq > ?"
            " AND seq < ?",
            (b.user_id, b.device_pk, mark.through, MAX_SEQ),
        )
    )
    while mark.through + 1 in above:
        mark.through += 1
        above.discard(mark.through)
    return mark


def _dedupe(conn: sqlite3.Connection, b: Batch, hwm: int) -> Stored:
    """The slow path: some seqs are at or below the mark, or the batch is out of order."""
    below = sorted({r[ROW_SEQ] for r in b.rows if r[ROW_SEQ] <= hwm})
    stored: dict[int, str] = {}
    for i in range(0, len(below), _LOOKUP_CHUNK):
        chunk = below[i : i + _LOOKUP_CHUNK]
        for seq, body in conn.execute(
            f"SELECT seq, body FROM events WHERE device_pk = ? AND seq IN ({','.join('?' * len(chunk))})",
            (b.device_pk, *chunk),
        ):
            stored[int(seq)] = events_pb2.Event.FromString(body).event_id
    return classify(b, stored)


def classify(b: Batch, stored: dict[int, str]) -> Stored:
    """Sort a batch's rows against the event ids already stored per seq (either backend's
    slow path): a new seq is inserted (and added to `stored`), the same event again is a
    duplicate, another event under a stored seq is a conflict."""
    inserted: list[int] = []
    duplicates = 0
    conflicts: list[ConflictRow] = []
    conflicting: list[int] = []
    for i, row in enumerate(b.rows):
        seq = row[ROW_SEQ]
        event_id = events_pb2.Event.FromString(row[ROW_BODY]).event_id
        prior = stored.get(seq)
        if prior is None:
            inserted.append(i)
            stored[seq] = event_id
        elif prior == event_id:
            duplicates += 1
        else:
            conflicts.append(
                (seq, event_id, f"seq {seq} already holds event {prior!r}; seqs must not be reused")
            )
            conflicting.append(i)
    inserted.sort(key=lambda i: b.rows[i][ROW_SEQ])
    return Stored(inserted, duplicates, conflicts, conflicting)


# -- the process ------------------------------------------------------------------------------
class _Turn:
    """Follows the server's b"1"/b"0" signals: is one of its own transactions running?"""

    def __init__(self, fd: int) -> None:
        self._free = threading.Event()
        self._free.set()
        self._fd = fd
        threading.Thread(target=self._follow, name="writer-turn", daemon=True).start()

    def _follow(self) -> None:
        while True:
            try:
                signals = os.read(self._fd, 4096)
            except OSError:
                signals = b""
            if not signals:  # the server is gone: never wait for it again
                self._free.set()
                return
            if signals[-1:] == b"1":
                self._free.clear()
            else:
                self._free.set()

    def wait(self) -> None:
        self._free.wait()


def _read_requests(stream: IO[bytes], into: queue.SimpleQueue[Any]) -> None:
    """Reader thread: queue each request as it arrives, then None at the end of stdin."""
    try:
        while (message := read_frame(stream)) is not None:
            into.put(message)
    finally:
        into.put(None)


def load_hook(name: str) -> CommitHook | None:
    """The function a hook name ("package.module:function") names; None for no name."""
    if not name:
        return None
    module, _, attr = name.partition(":")
    hook: CommitHook = getattr(importlib.import_module(module), attr)
    return hook


def serve(
    conn: sqlite3.Connection,
    control_fd: int,
    requests: IO[bytes],
    replies: IO[bytes],
    hook: CommitHook | None = None,
) -> None:
    """Commit the requests on `requests` and answer on `replies` until `requests` ends."""
    wait_turn = _Turn(control_fd).wait
    committer = Committer(conn, wait_turn=wait_turn)
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
    threading.Thread(
        target=_read_requests, args=(requests, inbox), name="writer-requests", daemon=True
    ).start()
    replies.write(frame(("ready",)))
    replies.flush()
    held: list[Any] = []  # a request that ended the last group, handled next
    try:
        while True:
            message = held.pop() if held else inbox.get()
            if message is None:
                return
            if message[0] == "forget":
                committer.forget(message[1])
                continue
            # The server's own transactions go first; batches that arrive meanwhile join this
            # group, as does everything that arrived while the last group committed: they all
            # share one fsync.
            wait_turn()
            tokens, group = [message[1]], [Batch(*message[2:])]
            size = group[0].size
            while size < MAX_GROUP_EVENTS:
                try:
                    message = inbox.get_nowait()
                except queue.Empty:
                    break
                if message is None or message[0] != "batch":
                    held.append(message)  # handled after this group, in order
                    break
                tokens.append(message[1])
                group.append(Batch(*message[2:]))
                size += group[-1].size
            commits = committer.commits
            results = committer.commit_group(group)
            reply = [
                (token, f"{type(r).__name__}: {r}", error_code(r))
                if isinstance(r, BaseException)
                else (
                    token,
                    r.inserted,
                    r.duplicates,
                    r.conflicts,
                    _derive(hook, b, r),
                    r.watermark,
                )
                for token, b, r in zip(tokens, group, results, strict=True)
            ]
            replies.write(frame((committer.commits - commits, reply)))
            replies.flush()
    finally:
        committer.conn.close()


def _derive(hook: CommitHook | None, batch: Batch, stored: Stored) -> Any:
    """The hook's result for the rows the commit inserted; None without a hook, or if it fails
    (its consumer then works from the rows; the commit stands either way)."""
    if hook is None:
        return None
    rows = batch.rows if stored.inserted is None else [batch.rows[i] for i in stored.inserted]
    try:
        return hook(rows, batch.device_pk)
    except Exception:
        log.exception("the commit hook failed on a batch", extra={"device": batch.device_pk})
        return None


def main(argv: list[str]) -> int:
    path, control_fd, busy_timeout_ms, log_format = argv[0], int(argv[1]), int(argv[2]), argv[3]
    hook_name = argv[4] if len(argv) > 4 else ""
    # The server's format ("json" lines or "text"), on the stderr it shares with the server.
    setup_logging("warning", json_lines=log_format == "json")
    # Ctrl-C in a terminal and a service manager's SIGTERM reach the whole process group: the
    # server stops gracefully and then closes stdin, after which the queue is committed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    widen_pipe(sys.stdin.fileno())
    widen_pipe(sys.stdout.fileno())
    try:
        conn = connect(path, busy_timeout_ms)
    except sqlite3.Error:
        log.exception("the ingest writer could not open the database", extra={"path": path})
        return 1
    try:
        hook = load_hook(hook_name)
    except (ImportError, AttributeError):
        log.exception("the ingest writer could not load its commit hook", extra={"hook": hook_name})
        conn.close()
        return 1
    try:
        serve(conn, control_fd, sys.stdin.buffer, sys.stdout.buffer, hook)
    except BrokenPipeError:  # the server is gone
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

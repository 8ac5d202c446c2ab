"""The durable outbox: events wait here, in sequence order, until the server acknowledges them.

Each `append` is one SQLite transaction (WAL, synchronous=FULL) that assigns sequence numbers
from a persisted counter: a number is never handed out twice, even after deletes, crashes and
restarts. `ack(through_seq)` deletes what the server has handled for good. Reads go through a
separate query-only connection, so they only ever see committed rows: an event is never sent
before it is durable here, and a crash can never re-issue a sequence number already sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import aiosqlite

from pulsesync.edge_agent.clock import Clock, SystemClock
from pulsesync.edge_agent.errors import OutboxCorrupt, OutboxError, OutboxFull
from pulsesync.v1 import events_pb2

__all__ = ["Outbox", "OutboxCorrupt", "OutboxError", "OutboxFull", "OutboxStats", "read_stats"]

log = logging.getLogger(__name__)

# Ride out a checkpoint or a `pulsesync-agent status` reading the file; report a stuck writer.
BUSY_TIMEOUT_MS: Final = 10_000
SCHEMA_VERSION: Final = 2

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS outbox (
    seq     INTEGER PRIMARY KEY,    -- the device's sequence number
    body    BLOB NOT NULL,          -- serialized pulsesync.v1.Event (seq, id and time set)
    mono_ns INTEGER,                -- the monotonic clock at device_time (NULL: unknown)
    boot    TEXT                    -- the boot that monotonic reading belongs to
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta VALUES ('next_seq', 1), ('acked_through', 0), ('last_ack_us', 0);
"""
# Schema 1 had no monotonic reading; its events keep the device time they were recorded with.
_UPGRADE_FROM_1: Final = """
ALTER TABLE outbox ADD COLUMN mono_ns INTEGER;
ALTER TABLE outbox ADD COLUMN boot TEXT;
"""

Monotonic = Callable[[], int]


def boot_monotonic_ns() -> int:
    """Nanoseconds on a clock that never steps and (on Linux) keeps counting in suspend."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def _default_monotonic() -> Monotonic:
    return boot_monotonic_ns if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic_ns


def current_boot_id() -> str:
    """This boot's id (Linux); elsewhere a per-process id, so readings never mix processes
    whose monotonic clocks may not share an origin."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or _PROCESS_BOOT
    except OSError:
        return _PROCESS_BOOT


_PROCESS_BOOT: Final = f"process-{uuid.uuid4()}"


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """A snapshot: events waiting, the last sequence number assigned and the last ack."""

    depth: int
    last_seq: int
    acked_through: int
    last_ack_us: int


class Outbox:
    """A SQLite outbox; open with `await Outbox.open(path)` or `async with Outbox.open(...)`."""

    def __init__(
        self,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        path: Path,
        clock: Clock,
        monotonic_ns: Monotonic | None = None,
        boot_id: str | None = None,
    ) -> None:
        self._writer = writer
        self._reader = reader
        self.path = path
        self._clock = clock
        self._monotonic_ns: Monotonic = monotonic_ns or _default_monotonic()
        self.boot_id = boot_id or current_boot_id()
        self._lock = asyncio.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._last_seq = 0
        self._acked_through = 0

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        clock: Clock | None = None,
        monotonic_ns: Monotonic | None = None,
        boot_id: str | None = None,
    ) -> Outbox:
        """Open (creating if needed) the outbox file at path.

        `clock` is the wall clock and `monotonic_ns` a clock that never steps (CLOCK_BOOTTIME
        by default); `boot_id` names the boot the monotonic readings belong to."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = await aiosqlite.connect(path, isolation_level=None)
        try:
            await writer.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            await writer.execute("PRAGMA journal_mode = WAL")
            await writer.execute("PRAGMA synchronous = FULL")
            (version,) = await _one(writer, "PRAGMA user_version")
            if version > SCHEMA_VERSION:
                raise OutboxError(
                    f"{path} was written by a newer pulsesync-agent (schema {version}); "
                    "upgrade the agent"
                )
            # A damaged page anywhere (not just the ones the first queries touch) is found now,
            # at start, rather than as a failed write an hour later; an outbox is small, so
            # the check costs milliseconds.
            problems = [str(r[0]) for r in await writer.execute_fetchall("PRAGMA quick_check")]
            if problems != ["ok"]:
                # The report can run to hundreds of lines; its last says what it means.
                lines = "\n".join(problems).splitlines()
                raise OutboxCorrupt(corrupt_message(path, lines[-1].strip()))
            upgrade = _UPGRADE_FROM_1 if version == 1 else ""
            await writer.executescript(
                f"BEGIN IMMEDIATE; {upgrade} {_SCHEMA} "
                f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )
            await _check_schema(writer, path)
            reader = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as e:
            await writer.close()
            raise db_error(e, path, "cannot open the outbox") from e
        except BaseException:
            await writer.close()
            raise
        await reader.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        await reader.execute("PRAGMA query_only = 1")
        outbox = cls(writer, reader, path, clock or SystemClock(), monotonic_ns, boot_id)
        stats = await outbox.stats()
        outbox._last_seq, outbox._acked_through = stats.last_seq, stats.acked_through
        return outbox

    async def close(self) -> None:
        """Close both connections."""
        await self._reader.close()
        await self._writer.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- writes -----------------------------------------------------------------------------
    async def append(
        self, events: Sequence[events_pb2.Event], *, mono_ns: Sequence[int] | None = None
    ) -> int:
        """Durably store events in one transaction; returns the last sequence number assigned.

        `mono_ns`, one per event, are readings of `monotonic_ns` at each event's device time
        (the Tracker takes them when recording); without them they are derived from the
        events' age by the wall clock now.

        Assigns each event its `seq` (always), and an `event_id` (UUID4) and `device_time` (now)
        when unset. The events are modified in place: the outbox owns them from here on. If
        the append fails, their `seq` is reset to 0; a nonzero seq means committed, even when
        the caller was cancelled meanwhile.
        """
        if not events:
            return self._last_seq
        try:
            return await _to_completion(self._append(events, mono_ns))
        except sqlite3.Error as e:
            raise db_error(e, self.path, "cannot write to the outbox") from e

    @property
    def monotonic_ns(self) -> Monotonic:
        """The monotonic clock whose readings this outbox stores with events."""
        return self._monotonic_ns

    async def _append(
        self, events: Sequence[events_pb2.Event], mono_ns: Sequence[int] | None
    ) -> int:
        now_us = self._clock.now_us()
        # The monotonic reading at each event's device time, taken from its age now: stored
        # with the event, it gives the event's true age at send time even if the wall clock
        # is stepped meanwhile.
        mono_now = self._monotonic_ns()
        boot = self.boot_id
        async with self._lock:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                (first,) = await _one(self._writer, "SELECT value FROM meta WHERE key='next_seq'")
                rows = []
                for seq, event in enumerate(events, start=first):
                    event.seq = seq
                    if not event.event_id:
                        event.event_id = str(uuid.uuid4())
                    if not event.HasField("device_time"):
                        event.device_time.FromMicroseconds(now_us)
                    if mono_ns is not None:
                        mono = mono_ns[seq - first]
                    else:
                        age_us = max(0, now_us - event.device_time.ToMicroseconds())
                        mono = mono_now - age_us * 1000
                    rows.append((seq, event.SerializeToString(), mono, boot))
                last = first + len(events) - 1
                await self._writer.executemany("INSERT INTO outbox VALUES (?, ?, ?, ?)", rows)
                await self._writer.execute(
                    "UPDATE meta SET value = ? WHERE key = 'next_seq'", (last + 1,)
                )
                await self._writer.execute("COMMIT")
            except BaseException:
                await _rollback(self._writer)
                for event in events:
                    event.seq = 0
                raise
            self._last_seq = last
        self._notify()
        return last

    async def ack(self, through_seq: int) -> int:
        """Delete every event with seq <= through_seq (the server has them); returns how many."""
        if through_seq <= self._acked_through:
            return 0
        try:
            return await _to_completion(self._ack(through_seq))
        except sqlite3.Error as e:
            raise db_error(e, self.path, "cannot delete acknowledged events from the outbox") from e

    async def _ack(self, through_seq: int) -> int:
        async with self._lock:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                cur = await self._writer.execute(
                    "DELETE FROM outbox WHERE seq <= ?", (through_seq,)
                )
                deleted = cur.rowcount
                await self._writer.executemany(
                    "UPDATE meta SET value = ? WHERE key = ?",
                    [(through_seq, "acked_through"), (self._clock.now_us(), "last_ack_us")],
                )
                await self._writer.execute("COMMIT")
            except BaseException:
                await _rollback(self._writer)
                raise
            self._acked_through = through_seq
        self._notify()
        return deleted

    # -- reads ------------------------------------------------------------------------------
    async def pending(self, after_seq: int = 0, limit: int = 500) -> list[events_pb2.Event]:
        """Up to `limit` committed events with seq > after_seq, in sequence order."""
        try:
            rows = await self._reader.execute_fetchall(
                "SELECT body FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
            )
        except sqlite3.Error as e:
            raise db_error(e, self.path, "cannot read the outbox") from e
        return [events_pb2.Event.FromString(body) for (body,) in rows]

    async def pending_with_age(
        self, after_seq: int = 0, limit: int = 500
    ) -> list[tuple[events_pb2.Event, int | None]]:
        """Like `pending`, with each event's age in microseconds by the monotonic clock (None
        when it was recorded in another boot or by an outbox of schema 1)."""
        try:
            rows = await self._reader.execute_fetchall(
                "SELECT body, mono_ns, boot FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            )
        except sqlite3.Error as e:
            raise db_error(e, self.path, "cannot read the outbox") from e
        mono_now, boot = self._monotonic_ns(), self.boot_id
        return [
            (
                events_pb2.Event.FromString(body),
                (mono_now - mono) // 1000 if mono is not None and b == boot else None,
            )
            for body, mono, b in rows
        ]

    async def count(self) -> int:
        """How many events wait for an ack."""
        (n,) = await _one(self._reader, "SELECT count(*) FROM outbox")
        return int(n)

    async def stats(self) -> OutboxStats:
        """Depth, last assigned seq and last ack, as committed."""
        rows = await self._reader.execute_fetchall("SELECT key, value FROM meta")
        meta = {str(k): int(v) for k, v in rows}
        return OutboxStats(
            depth=await self.count(),
            last_seq=int(meta["next_seq"]) - 1,
            acked_through=int(meta["acked_through"]),
            last_ack_us=int(meta["last_ack_us"]),
        )

    @property
    def last_seq(self) -> int:
        """The last sequence number this process committed (or found at open)."""
        return self._last_seq

    @property
    def acked_through(self) -> int:
        """The highest sequence number the server has acknowledged."""
        return self._acked_through

    # -- notification -----------------------------------------------------------------------
    def add_listener(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call fn (on the event loop) after every committed append or ack; returns a remover."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn)

    def _notify(self) -> None:
        for fn in list(self._listeners):
            try:
                fn()
            except Exception:
                log.exception("outbox listener failed")


def corrupt_message(path: Path, detail: str) -> str:
    """What to tell the person about a damaged outbox file."""
    return (
        f"the outbox {path} is damaged or is not a pulsesync-agent outbox ({detail}). "
        f"Stop the agent, move the file aside (`mv {path} {path}.damaged`; remove "
        f"{path.name}-wal and {path.name}-shm beside it) and start the agent again: it creates "
        "a new outbox. Events in the damaged file that were not uploaded yet are lost."
    )


def db_error(e: sqlite3.Error, path: Path, doing: str) -> OutboxError:
    """The agent's error for a SQLite failure on the outbox at path (the one translation)."""
    code = getattr(e, "sqlite_errorcode", 0) & 0xFF  # primary result code
    if code == sqlite3.SQLITE_FULL:
        return OutboxFull(
            f"{doing} {path}: the disk is full. Free space on the device; recorded events are "
            "kept in memory meanwhile (up to the tracker's queue limit) and written once there "
            "is room"
        )
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) or (
        isinstance(e, sqlite3.DatabaseError) and "malformed" in str(e)
    ):
        return OutboxCorrupt(corrupt_message(path, str(e)))
    return OutboxError(f"{doing} {path}: {e}")


_COLUMNS: Final = {"outbox": ["seq", "body", "mono_ns", "boot"], "meta": ["key", "value"]}


async def _check_schema(conn: aiosqlite.Connection, path: Path) -> None:
    """Refuse a file whose tables are not the outbox's (another app's database, say)."""
    for table, want in _COLUMNS.items():
        rows = await conn.execute_fetchall(f"SELECT name FROM pragma_table_info('{table}')")
        got = [str(r[0]) for r in rows]
        if got != want:
            raise OutboxCorrupt(corrupt_message(path, f"table {table} has columns {got}"))
    rows = await conn.execute_fetchall(
        "SELECT key FROM meta WHERE key IN ('next_seq', 'acked_through', 'last_ack_us')"
    )
    if len(list(rows)) != 3:
        raise OutboxCorrupt(corrupt_message(path, "its meta table lacks the sequence counters"))


async def _to_completion(work: Coroutine[Any, Any, int]) -> int:
    """Run a transaction to its end even if the caller is cancelled: a transaction cut off
    between BEGIN and COMMIT would leave the connection inside it. On cancellation the caller
    still gets CancelledError, after the transaction has finished."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        raise


async def _one(conn: aiosqlite.Connection, sql: str) -> tuple[int, ...]:
    rows = list(await conn.execute_fetchall(sql))
    return tuple(rows[0])


async def _rollback(conn: aiosqlite.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):  # none open (e.g. COMMIT itself failed)
        await conn.execute("ROLLBACK")


def read_stats(path: str | Path) -> OutboxStats:
    """Stats of an outbox file without opening it for writing (for `pulsesync-agent status`)."""
    conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        (depth,) = conn.execute("SELECT count(*) FROM outbox").fetchone()
    except sqlite3.Error as e:
        raise db_error(e, Path(path), "cannot read the outbox") from e
    finally:
        conn.close()
    return OutboxStats(int(depth), int(meta["next_seq"]) - 1, int(meta["acked_through"]),
                       int(meta["last_ack_us"]))  # fmt: skip

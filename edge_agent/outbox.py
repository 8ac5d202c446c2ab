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
SCHEMA_VERSION: Final = 1

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS outbox (
    seq  INTEGER PRIMARY KEY,       -- the device's sequence number
    body BLOB NOT NULL              -- serialized pulsesync.v1.Event (seq, id and time set)
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta VALUES ('next_seq', 1), ('acked_through', 0), ('last_ack_us', 0);
"""


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
        self, writer: aiosqlite.Connection, reader: aiosqlite.Connection, path: Path, clock: Clock
    ) -> None:
        self._writer = writer
        self._reader = reader
        self.path = path
        self._clock = clock
        self._lock = asyncio.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._last_seq = 0
        self._acked_through = 0

    @classmethod
    async def open(cls, path: str | Path, *, clock: Clock | None = None) -> Outbox:
        """Open (creating if needed) the outbox file at path."""
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
            await writer.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
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
        outbox = cls(writer, reader, path, clock or SystemClock())
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
    async def append(self, events: Sequence[events_pb2.Event]) -> int:
        """Durably store events in one transaction; returns the last sequence number assigned.

        Assigns each event its `seq` (always), and an `event_id` (UUID4) and `device_time` (now)
        when unset. The events are modified in place: the outbox owns them from here on. If
        the append fails, their `seq` is reset to 0; a nonzero seq means committed, even when
        the caller was cancelled meanwhile.
        """
        if not events:
            return self._last_seq
        try:
            return await _to_completion(self._append(events))
        except sqlite3.Error as e:
            raise db_error(e, self.path, "cannot write to the outbox") from e

    async def _append(self, events: Sequence[events_pb2.Event]) -> int:
        now_us = self._clock.now_us()
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
                    rows.append((seq, event.SerializeToString()))
                last = first + len(events) - 1
                await self._writer.executemany("INSERT INTO outbox VALUES (?, ?)", rows)
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


_COLUMNS: Final = {"outbox": ["seq", "body"], "meta": ["key", "value"]}


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

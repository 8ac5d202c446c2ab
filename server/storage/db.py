"""The embedded database: a write connection, a read connection and schema migrations.

SQLite in WAL mode lets readers run beside the single writer, so queries never wait behind
ingest commits. Writes go through one connection (SQLite has one writer anyway); every
commit is durable (`synchronous=FULL`), which costs little because ingest commits in batches.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import aiosqlite

from pulsesync.server.errors import PulseSyncError, ResourceExhausted, Unavailable
from pulsesync.server.storage.errors import DatabaseUnavailable
from pulsesync.server.storage.files import private_database
from pulsesync.server.storage.versions import Migration, read_migrations

log = logging.getLogger(__name__)

# Long enough to ride out a checkpoint or a burst from another process (the CLI), short
# enough that a stuck writer is reported instead of hanging a request.
BUSY_TIMEOUT_MS: Final = 10_000
# Bytes per database page, for new databases (an existing file keeps its own). Ingest appends
# ~150-byte rows to two b-trees (events and its per-user time index); 16 KiB pages take them
# with a quarter of the page splits and WAL frames of SQLite's 4 KiB default: a writer measured
# alone inserts ~17% faster (docs/benchmarks-history.md, Ingest).
PAGE_SIZE: Final = 16384


# The first line of a migration that rebuilds tables (create, copy, drop, rename): it runs
# with foreign keys off and is checked before it commits (_apply).
REBUILD_MARK: Final = "-- pulsesync: rebuilds tables"


def load_migrations() -> list[Migration]:
    """The numbered SQL files shipped in this package, in order."""
    return read_migrations("pulsesync.server.storage.migrations")


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # takes effect when the file is created
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")


def sqlite_code(e: BaseException | None) -> int | None:
    """SQLite's primary result code behind e (or an exception it was raised from), if any."""
    while e is not None:
        if isinstance(e, sqlite3.Error):
            code = getattr(e, "sqlite_errorcode", None)
            if code is not None:
                return int(code) & 0xFF  # an extended code's low byte is its primary code
        e = e.__cause__ or e.__context__
    return None


# SQLite's answers for a file whose pages are not what SQLite wrote: the database is damaged.
DAMAGE_CODES: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


def storage_full_error() -> ResourceExhausted:
    """A full disk (SQLITE_FULL) as RESOURCE_EXHAUSTED with a reason, for the caller's client."""
    return ResourceExhausted(
        "the server's storage is full; nothing was written. Retry later (reads still work)",
        reason="STORAGE_FULL",
    )


def storage_damaged_error() -> Unavailable:
    """What every request gets once the database is known to be damaged."""
    return Unavailable(
        "the server's database is damaged; nothing was read or written. The operator must "
        "restore it (see the server's log); retry later",
        reason="STORAGE_DAMAGED",
    )


class DatabaseDamaged(RuntimeError):
    """SQLite reports the database file as damaged: the server must not serve or write it."""


def damaged_message(path: str | Path, detail: str) -> str:
    """What an operator reads when the database is damaged: what is wrong and what to do."""
    return (
        f"the database {path} is damaged ({detail}); the server will not serve or write to it. "
        "Stop here and restore the file (with its -wal file, if any) from a backup, or recover "
        f"what SQLite can still read with `sqlite3 {path} .recover | sqlite3 recovered.db` and "
        "start with --db recovered.db"
    )


def check_integrity(path: str | Path) -> None:
    """Raise DatabaseDamaged unless SQLite's quick_check passes on the database at path.

    quick_check reads every page and checks the b-tree structure (not that index entries match
    their rows, which the full integrity_check also does): O(N) in the file size but without
    integrity_check's index lookups; the README gives its measured cost."""
    if str(path) == ":memory:" or not Path(path).exists():
        return
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check(5)")]
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:  # "file is not a database", "malformed", ...
        raise DatabaseDamaged(damaged_message(path, str(e))) from None
    if problems != ["ok"]:
        detail = "; ".join(line for p in problems for line in p.splitlines() if line.strip())
        raise DatabaseDamaged(damaged_message(path, detail))


def migrate(path: str | Path) -> list[str]:
    """Apply pending migrations to the database at path (created if missing); names applied."""
    if str(path) != ":memory:":
        private_database(Path(path))  # before SQLite creates anything: 0700 dir, 0600 files
    check_integrity(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        _configure(conn)
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_us INTEGER NOT NULL)"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        applied: list[str] = []
        for m in load_migrations():
            if m.version in done:
                continue
            _apply(conn, m)
            applied.append(m.name)
        if applied:  # one line, not one per migration (a new database applies them all)
            log.info("applied %d schema migrations: %s", len(applied), ", ".join(applied))
        return applied
    finally:
        conn.close()


def _apply(conn: sqlite3.Connection, m: Migration) -> None:
    """Apply one migration in one transaction, recorded in schema_migrations."""
    # A migration that rebuilds a table (SQLite cannot alter a column's definition) drops the
    # old one: with foreign keys on, that would delete, through ON DELETE CASCADE, every row
    # referring to it. Such a migration runs with them off (a pragma that has no effect
    # inside a transaction, so set before it) and must leave every reference whole.
    rebuild = m.sql.lstrip().startswith(REBUILD_MARK)
    if rebuild:
        conn.execute("PRAGMA foreign_keys = OFF")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _split_sql(m.sql):
                conn.execute(statement)
            if rebuild and (broken := conn.execute("PRAGMA foreign_key_check").fetchall()):
                table, rowid, parent, _ = broken[0]
                raise RuntimeError(
                    f"migration {m.name} would leave {len(broken)} row(s) referring to rows "
                    f"that do not exist (the first: {table} rowid {rowid}, referring to "
                    f"{parent}); nothing was changed"
                )
            conn.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                (m.version, m.name, time.time_ns() // 1000),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        if rebuild:
            conn.execute("PRAGMA foreign_keys = ON")


def _split_sql(script: str) -> list[str]:
    """Statements of a migration script (complete_statement handles ';' inside strings)."""
    statements: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        if not current and line.strip().startswith("--"):
            continue
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise RuntimeError(f"incomplete SQL statement in migration: {current.strip()[:80]}")
    return statements


class Database:
    """The server's two connections to one SQLite file. Use `async with Database.open(...)`."""

    def __init__(self, path: Path, writer: aiosqlite.Connection, reader: aiosqlite.Connection):
        self.path = path
        self.writer = writer
        self.reader = reader
        # One writer connection is shared by every task: a transaction holds this lock from
        # BEGIN to COMMIT so that two tasks' statements never interleave.
        self._write_lock = asyncio.Lock()
        self._write_watchers: list[Callable[[bool], None]] = []
        # Set once SQLite reports the file damaged while serving: nothing is read or written
        # after that (a damaged b-tree can lose or misplace what is written to it).
        self.damage: str | None = None
        self._damage_watchers: list[Callable[[], None]] = []

    def on_damage(self, fn: Callable[[], None]) -> None:
        """Call fn() once, when the database is found damaged while serving."""
        self._damage_watchers.append(fn)

    def report_damage(self, detail: str) -> None:
        """Mark the database damaged: one log line saying what to do, then the watchers."""
        if self.damage is not None:
            return
        self.damage = detail
        log.critical(damaged_message(self.path, detail))
        for fn in self._damage_watchers:
            fn()

    def refuse_if_damaged(self) -> None:
        """Raise STORAGE_DAMAGED if the database was found damaged."""
        if self.damage is not None:
            raise storage_damaged_error()

    def storage_error(self, code: int | None, detail: str) -> PulseSyncError | None:
        """The client's error for SQLite's primary result code, if it is about the storage
        (full or damaged; a damaged file is reported here); None for any other code."""
        if code == sqlite3.SQLITE_FULL:
            return storage_full_error()
        if code in DAMAGE_CODES:
            self.report_damage(detail)
            return storage_damaged_error()
        return None

    def raise_for_storage(self, e: BaseException) -> None:
        """Raise the client's error if e is a full or damaged storage; return otherwise."""
        error = self.storage_error(sqlite_code(e), str(e))
        if error is not None:
            raise error from e

    def watch_writes(self, fn: Callable[[bool], None]) -> Callable[[], None]:
        """Call fn(True) when a `transaction()` takes the write lock and fn(False) when it
        lets go (for a writer on another connection that yields to these); returns an
        unwatch function."""
        self._write_watchers.append(fn)
        return lambda: self._write_watchers.remove(fn)

    def _signal_writes(self, held: bool) -> None:
        for fn in self._write_watchers:
            fn(held)

    async def _settle(self, sql: str) -> bool:
        """Run sql on the write connection to its end even if the caller is cancelled meanwhile
        (the statement runs on in aiosqlite's thread regardless, so abandoning it would leave
        the connection in an unknown state); returns whether a cancellation arrived."""
        task = asyncio.ensure_future(self.writer.execute(sql))
        cancelled = False
        while True:
            try:
                await asyncio.shield(task)
                return cancelled
            except asyncio.CancelledError:
                if task.done():
                    raise
                cancelled = True
            except BaseException:
                if cancelled:
                    # The statement failed after the caller was cancelled: the cancellation
                    # still stands (swallowing it would leave e.g. a stopping loop running).
                    raise asyncio.CancelledError from None
                raise

    async def _rollback_if_open(self) -> bool:
        """ROLLBACK if the connection is inside a transaction (SQLite rolls back by itself on
        some errors, e.g. a full disk); returns whether a cancellation arrived meanwhile."""
        if self.writer.in_transaction:
            return await self._settle("ROLLBACK")
        return False

    async def _roll_back_after(self, error: BaseException) -> None:
        """Roll back after `error`, raising the client's storage error for it if it is one; a
        cancel that arrives meanwhile wins over the error (it must reach the caller)."""
        if await self._rollback_if_open() and not isinstance(error, asyncio.CancelledError):
            raise asyncio.CancelledError from error
        self.raise_for_storage(error)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error).

        Cancellation-safe: BEGIN, COMMIT and ROLLBACK always run to their end, and a task
        cancelled at any await leaves the connection outside any transaction."""
        async with self._write_lock:
            self.refuse_if_damaged()
            self._signal_writes(True)
            try:
                if self.writer.in_transaction:
                    # Only a transaction() may begin one on this connection; one left open
                    # (a statement run outside it) would fail every write from here on.
                    log.error("a transaction was left open on the write connection; rolled back")
                    if await self._rollback_if_open():
                        raise asyncio.CancelledError
                try:
                    begun_cancelled = await self._settle("BEGIN IMMEDIATE")
                except sqlite3.Error as e:
                    self.raise_for_storage(e)
                    raise
                if begun_cancelled:
                    await self._rollback_if_open()
                    raise asyncio.CancelledError
                try:
                    yield self.writer
                except BaseException as e:
                    await self._roll_back_after(e)
                    raise
                try:
                    cancelled = await self._settle("COMMIT")
                except BaseException as e:
                    await self._roll_back_after(e)
                    raise
                if cancelled:
                    raise asyncio.CancelledError
            finally:
                self._signal_writes(False)

    @classmethod
    async def open(cls, path: str | Path) -> Database:
        """Migrate, then open the write and read connections (DatabaseUnavailable when the
        file cannot be created or opened: a missing folder, no permission)."""
        path = Path(path)
        try:
            migrate(path)
        except (OSError, sqlite3.OperationalError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise DatabaseUnavailable(f"cannot open the database {path}: {reason}") from e
        writer = await aiosqlite.connect(path, isolation_level=None)
        reader = await aiosqlite.connect(path, isolation_level=None)
        for conn in (writer, reader):
            await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            await conn.execute("PRAGMA synchronous = FULL")
            await conn.execute("PRAGMA foreign_keys = ON")
        await reader.execute("PRAGMA query_only = ON")
        return cls(path, writer, reader)

    async def close(self) -> None:
        await self.reader.close()
        await self.writer.close()

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

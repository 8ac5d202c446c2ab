"""The SQLite key vault: each person's wrapped data key, in a small SQLite file apart from the database.

    database (pulsesync.db)   profile ciphertexts, and the id of the vault they belong to
    key vault (keyvault.db)   per-person data keys, wrapped by the KEK (mode 0600)
    key file (kek.key)        the key-encryption keys

Keeping the data keys out of the main database is what lets erasure reach backups: a backup
of the database holds only ciphertext, so destroying a person's vault row (and compacting the
vault, so no page or log frame keeps the wrapped key) leaves every copy of their profile
unreadable, while everyone else's profile in the same backup still opens with the live vault.

The vault is opened per operation (a connection costs microseconds, operations are rare: one
read per person per process, one insert per new person, one delete per erasure) so nothing
holds it open and every write is durable (`synchronous=FULL`) before the caller goes on.
`secure_delete` overwrites deleted cells with zeros; `shred` adds VACUUM and a TRUNCATE
checkpoint so neither the file nor its write-ahead log keeps an old page.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

from pulsesync.server.profiles.crypto import KeyFileError, shared_with_others
from pulsesync.server.storage.keys import ShredReport, VaultKey, WrappedKey

VAULT_FORMAT: Final = "pulsesync-keyvault-v1"
# Long enough to ride out another process's (the CLI's) short transaction on the vault.
_BUSY_TIMEOUT_MS: Final = 10_000
# A checkpoint cannot truncate the log while another connection reads an old snapshot; the
# vault's transactions last microseconds, so a few short retries are plenty.
_CHECKPOINT_ATTEMPTS: Final = 20
_CHECKPOINT_PAUSE_S: Final = 0.05

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS vault_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS data_keys ("
    " user_id INTEGER PRIMARY KEY,"  # the person (an id of the main database)
    " key_id TEXT NOT NULL,"  # public id of the data key, bound in every AAD
    " kek_id TEXT NOT NULL,"  # the key-encryption key that wraps it
    " wrapped_key BLOB NOT NULL,"  # nonce || AES-GCM(KEK, data key), AAD user + key id
    " create_us INTEGER NOT NULL,"
    " wrap_us INTEGER NOT NULL)",  # last (re-)wrap, e.g. by `keys rotate`
)

T = TypeVar("T")


class KeyVaultError(KeyFileError):
    """The key vault is missing, unreadable or belongs to another database: do not start."""


def _row(r: Any) -> VaultKey:
    user_id, key_id, kek_id, blob, create_us, wrap_us = r
    return VaultKey(
        int(user_id),
        str(key_id),
        WrappedKey(str(kek_id), bytes(blob)),
        int(create_us),
        int(wrap_us),
    )


def vault_files(path: Path) -> list[Path]:
    """The vault and the side files SQLite keeps next to it (log, shared index)."""
    return [path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))]


def vault_bytes(path: Path) -> bytes:
    """Every byte on disk of the vault, its log included (for scans in tests and checks)."""
    return b"".join(f.read_bytes() for f in vault_files(path) if f.exists())


class KeyVault:
    """Wrapped data keys in their own SQLite file (see the module docstring)."""

    def __init__(self, path: Path, vault_id: str) -> None:
        self.path = path
        self.vault_id = vault_id

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    async def create(cls, path: Path) -> KeyVault:
        """A new, empty vault file with mode 0600 (fails if the file exists)."""
        return await asyncio.to_thread(cls._create, path)

    @classmethod
    def _create(cls, path: Path) -> KeyVault:
        path.parent.mkdir(parents=True, exist_ok=True)
        for side in vault_files(path)[1:]:
            # Side files of a vault that was deleted would be read as part of the new one.
            side.unlink(missing_ok=True)
        # SQLite creates the log and shared-index files with the database file's mode, so
        # creating it 0600 before SQLite touches it keeps all three private.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        vault_id = "vault_" + secrets.token_hex(16)
        conn = sqlite3.connect(path, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA secure_delete = ON")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.executemany(
                "INSERT INTO vault_meta VALUES (?, ?)",
                [("format", VAULT_FORMAT), ("vault_id", vault_id)],
            )
            conn.execute("COMMIT")
        finally:
            conn.close()
        _fsync_dir(path.parent)
        return cls(path, vault_id)

    @classmethod
    async def load(cls, path: Path) -> KeyVault:
        """Open an existing vault, refusing one that others can read or that is not a vault."""
        return await asyncio.to_thread(cls._load, path)

    @classmethod
    def _load(cls, path: Path) -> KeyVault:
        try:
            st = path.stat()
        except OSError as e:
            raise KeyVaultError(f"cannot read the key vault {path}: {e.strerror}") from None
        if (problem := shared_with_others(path, st, "the key vault")) is not None:
            raise KeyVaultError(problem)
        vault = cls(path, "")
        try:
            with vault._connect() as conn:
                meta = dict(conn.execute("SELECT name, value FROM vault_meta").fetchall())
                conn.execute("SELECT COUNT(*) FROM data_keys").fetchone()
        except sqlite3.DatabaseError as e:
            raise KeyVaultError(
                f"the key vault {path} is not a PulseSync key vault ({e}); restore it from "
                "its backup, or point --key-vault / PULSESYNC_KEY_VAULT at the right file"
            ) from None
        if meta.get("format") != VAULT_FORMAT or not meta.get("vault_id"):
            raise KeyVaultError(
                f"the key vault {path} is not a PulseSync key vault (format "
                f"{meta.get('format')!r}); point --key-vault / PULSESYNC_KEY_VAULT at the "
                "right file"
            )
        return cls(path, str(meta["vault_id"]))

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # mode=rw: a vault deleted while the server runs is an error, never a fresh empty one.
        conn = sqlite3.connect(
            f"{self.path.resolve().as_uri()}?mode=rw",
            uri=True,
            isolation_level=None,
            timeout=_BUSY_TIMEOUT_MS / 1000,
        )
        try:
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA secure_delete = ON")
            conn.execute("PRAGMA temp_store = MEMORY")  # VACUUM's copy stays out of files
            yield conn
        finally:
            conn.close()

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            with self._connect() as conn:
                return fn(conn)

        return await asyncio.to_thread(call)

    # -- reading -------------------------------------------------------------------------------
    async def get(self, user_id: int) -> VaultKey | None:
        """The person's wrapped data key, if they have one."""

        def q(conn: sqlite3.Connection) -> VaultKey | None:
            r = conn.execute(
                "SELECT user_id, key_id, kek_id, wrapped_key, create_us, wrap_us"
                " FROM data_keys WHERE user_id = ?",
                (user_id,),
            ).fetchone()
            return None if r is None else _row(r)

        return await self._run(q)

    async def all(self) -> list[VaultKey]:
        """Every wrapped data key, by user id."""

        def q(conn: sqlite3.Connection) -> list[VaultKey]:
            return [
                _row(r)
                for r in conn.execute(
                    "SELECT user_id, key_id, kek_id, wrapped_key, create_us, wrap_us"
                    " FROM data_keys ORDER BY user_id"
                )
            ]

        return await self._run(q)

    async def kek_counts(self) -> dict[str, int]:
        """How many data keys each KEK wraps."""

        def q(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute("SELECT kek_id, COUNT(*) FROM data_keys GROUP BY kek_id")
            return {str(k): int(n) for k, n in rows}

        return await self._run(q)

    async def user_ids(self) -> set[int]:
        """The people who have a data key."""

        def q(conn: sqlite3.Connection) -> set[int]:
            return {int(r[0]) for r in conn.execute("SELECT user_id FROM data_keys")}

        return await self._run(q)

    # -- writing -------------------------------------------------------------------------------
    async def add(self, key: VaultKey) -> bool:
        """Store a new data key durably; False if the person already has one."""

        def q(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT INTO data_keys (user_id, key_id, kek_id, wrapped_key, create_us,"
                " wrap_us) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_id) DO NOTHING",
                (
                    key.user_id,
                    key.key_id,
                    key.wrapped.kek_id,
                    key.wrapped.blob,
                    key.create_us,
                    key.wrap_us,
                ),
            )
            return cur.rowcount == 1

        return await self._run(q)

    async def add_many(self, keys: list[VaultKey]) -> None:
        """Store keys in one transaction, keeping any the vault already holds."""

        def q(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT INTO data_keys (user_id, key_id, kek_id, wrapped_key, create_us,"
                    " wrap_us) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_id) DO NOTHING",
                    [
                        (
                            k.user_id,
                            k.key_id,
                            k.wrapped.kek_id,
                            k.wrapped.blob,
                            k.create_us,
                            k.wrap_us,
                        )
                        for k in keys
                    ],
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        await self._run(q)

    async def replace_wrapped(self, updates: list[tuple[VaultKey, WrappedKey]], now_us: int) -> int:
        """Re-wrap keys in one transaction; a row changed meanwhile is left alone.
        The number of rows updated."""

        def q(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            done = 0
            try:
                for old, new in updates:
                    cur = conn.execute(
                        "UPDATE data_keys SET kek_id = ?, wrapped_key = ?, wrap_us = ?"
                        " WHERE user_id = ? AND key_id = ? AND kek_id = ? AND wrapped_key = ?",
                        (
                            new.kek_id,
                            new.blob,
                            now_us,
                            old.user_id,
                            old.key_id,
                            old.wrapped.kek_id,
                            old.wrapped.blob,
                        ),
                    )
                    done += cur.rowcount
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return done

        return await self._run(q)

    async def shred(self, user_id: int) -> ShredReport:
        """Delete the person's data key and compact the vault so no copy of it remains."""

        def q(conn: sqlite3.Connection) -> ShredReport:
            cur = conn.execute("DELETE FROM data_keys WHERE user_id = ?", (user_id,))
            deleted = cur.rowcount > 0
            busy = _compact(conn)
            return ShredReport(deleted, busy, len(vault_bytes(self.path)))

        return await self._run(q)

    async def discard(self, user_id: int, key_id: str) -> bool:
        """Delete one key if it is still the person's (no compaction: it protected nothing)."""

        def q(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "DELETE FROM data_keys WHERE user_id = ? AND key_id = ?", (user_id, key_id)
            )
            return cur.rowcount > 0

        return await self._run(q)

    async def compact(self) -> bool:
        """VACUUM and empty the log (after a rotation); whether the log stayed busy."""
        return await self._run(_compact)


def _compact(conn: sqlite3.Connection) -> bool:
    """VACUUM (every page rewritten, freed ones dropped), then a TRUNCATE checkpoint (the
    rewritten pages copied home and the log, which held the old page images, emptied).
    True if another connection kept the log busy throughout."""
    conn.execute("VACUUM")
    for _ in range(_CHECKPOINT_ATTEMPTS):
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if not busy:
            return False
        time.sleep(_CHECKPOINT_PAUSE_S)
    return True


def compact_database(path: Path) -> bool:
    """The same compaction for another SQLite file (the main database after an upgrade)."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000)
    try:
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute("PRAGMA temp_store = MEMORY")
        return _compact(conn)
    finally:
        conn.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

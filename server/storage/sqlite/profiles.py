"""SQLite implementation of the profile storage seam."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pulsesync.server.storage.db import Database
from pulsesync.server.storage.profiles import SealedVersion

_COLUMNS = "version, key_id, nonce, ciphertext"


def _sealed(row: sqlite3.Row) -> SealedVersion:
    version, key_id, nonce, ciphertext = row
    return SealedVersion(int(version), str(key_id), bytes(nonce), bytes(ciphertext))


@asynccontextmanager
async def secure_delete(db: Database) -> AsyncIterator[None]:
    """Deletes inside overwrite the freed cells with zeros (then the setting is restored)."""
    async with db.writer.execute("PRAGMA secure_delete") as cur:
        row = await cur.fetchone()
    before = int(row[0]) if row else 0
    await db.writer.execute("PRAGMA secure_delete = ON")
    try:
        yield
    finally:
        await db.writer.execute(f"PRAGMA secure_delete = {before}")


class SqliteProfileStorage:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def latest(self, user_id: int) -> SealedVersion | None:
        async with self._db.reader.execute(
            f"SELECT {_COLUMNS} FROM profile_versions WHERE user_id = ?"
            " ORDER BY version DESC LIMIT 1",
            (user_id,),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else _sealed(row)

    async def version(self, user_id: int, version: int) -> SealedVersion | None:
        async with self._db.reader.execute(
            f"SELECT {_COLUMNS} FROM profile_versions WHERE user_id = ? AND version = ?",
            (user_id, version),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else _sealed(row)

    async def versions_after(self, user_id: int, after: int) -> list[SealedVersion]:
        async with self._db.reader.execute(
            f"SELECT {_COLUMNS} FROM profile_versions WHERE user_id = ? AND version > ?"
            " ORDER BY version",
            (user_id, after),
        ) as cur:
            return [_sealed(r) for r in await cur.fetchall()]

    async def append(
        self,
        user_id: int,
        base_version: int,
        sealed: SealedVersion,
        device_id: str,
        now_us: int,
        keep: int,
    ) -> bool:
        async with self._db.transaction() as tx:
            async with tx.execute(
                "SELECT MAX(version) FROM profile_versions WHERE user_id = ?", (user_id,)
            ) as cur:
                row = await cur.fetchone()
            if int((row[0] if row else None) or 0) != base_version:
                return False
            await tx.execute(
                "INSERT INTO profile_versions (user_id, version, key_id, nonce, ciphertext,"
                " device_id, create_us) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    user_id,
                    sealed.version,
                    sealed.key_id,
                    sealed.nonce,
                    sealed.ciphertext,
                    device_id,
                    now_us,
                ),
            )
            await tx.execute(
                "DELETE FROM profile_versions WHERE user_id = ? AND version <= ?",
                (user_id, sealed.version - keep),
            )
        return True

    async def key_in_use(self, user_id: int, key_id: str) -> bool:
        async with self._db.reader.execute(
            "SELECT 1 FROM profile_versions WHERE user_id = ? AND key_id = ? LIMIT 1",
            (user_id, key_id),
        ) as cur:
            return await cur.fetchone() is not None

    async def users_with_versions(self) -> set[int]:
        async with self._db.reader.execute("SELECT DISTINCT user_id FROM profile_versions") as cur:
            return {int(r[0]) for r in await cur.fetchall()}

    async def counts(self) -> tuple[int, int]:
        async with self._db.reader.execute(
            "SELECT COUNT(*), COUNT(DISTINCT user_id) FROM profile_versions"
        ) as cur:
            row = await cur.fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def erase_user(self, user_id: int) -> None:
        async with secure_delete(self._db), self._db.transaction() as tx:
            for table in ("profile_versions", "profile_feature_usage"):
                await tx.execute(f"DELETE FROM {table} WHERE user_id = ?", (user_id,))

    async def usage_scores(self, user_id: int) -> dict[str, tuple[float, int]]:
        async with self._db.reader.execute(
            "SELECT feature, score, ref_us FROM profile_feature_usage WHERE user_id = ?",
            (user_id,),
        ) as cur:
            return {str(f): (float(s), int(r)) for f, s, r in await cur.fetchall()}

    async def save_usage(
        self, user_id: int, scores: dict[str, tuple[float, int]], dropped: list[str]
    ) -> None:
        async with self._db.transaction() as tx:
            await tx.executemany(
                "INSERT INTO profile_feature_usage (user_id, feature, score, ref_us)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (user_id, feature)"
                " DO UPDATE SET score = excluded.score, ref_us = excluded.ref_us",
                [(user_id, f, *scores[f]) for f in sorted(scores)],
            )
            await tx.executemany(
                "DELETE FROM profile_feature_usage WHERE user_id = ? AND feature = ?",
                [(user_id, f) for f in dropped],
            )

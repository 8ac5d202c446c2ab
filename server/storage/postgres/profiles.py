"""PostgreSQL implementation of the profile storage seam: sealed profile versions and usage scores.

The same semantics as the SQLite one (`pulsesync.server.storage.sqlite.profiles`). The
compare-and-set of `append` takes the person's row in `users` FOR UPDATE first: several replicas
may write one person's profile at once, and under READ COMMITTED two writers could both read
the same latest version without that lock; with it the second one reads the first one's commit
and loses cleanly. Every statement names the person, so each runs on one shard when the tables
are distributed by user_id.
"""

from __future__ import annotations

from typing import Final

import asyncpg

from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.server.storage.profiles import SealedVersion

_COLUMNS: Final = "version, key_id, nonce, ciphertext"


def _sealed(row: asyncpg.Record) -> SealedVersion:
    version, key_id, nonce, ciphertext = row
    return SealedVersion(int(version), str(key_id), bytes(nonce), bytes(ciphertext))


def affected(status: str) -> int:
    """Rows a statement touched, from its command tag ("DELETE 3", "INSERT 0 1")."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class PostgresProfileStorage:
    def __init__(self, pool: PostgresPool) -> None:
        self._pool = pool

    async def latest(self, user_id: int) -> SealedVersion | None:
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM profile_versions WHERE user_id = $1"
            " ORDER BY version DESC LIMIT 1",
            user_id,
        )
        return _sealed(rows[0]) if rows else None

    async def version(self, user_id: int, version: int) -> SealedVersion | None:
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM profile_versions WHERE user_id = $1 AND version = $2",
            user_id,
            version,
        )
        return _sealed(rows[0]) if rows else None

    async def versions_after(self, user_id: int, after: int) -> list[SealedVersion]:
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM profile_versions WHERE user_id = $1 AND version > $2"
            " ORDER BY version",
            user_id,
            after,
        )
        return [_sealed(r) for r in rows]

    async def append(
        self,
        user_id: int,
        base_version: int,
        sealed: SealedVersion,
        device_id: str,
        now_us: int,
        keep: int,
    ) -> bool:
        async with self._pool.transaction() as tx:
            # The person's row serializes writers of one profile across replicas (see above).
            await tx.execute("SELECT 1 FROM users WHERE user_id = $1 FOR UPDATE", user_id)
            latest = await tx.fetchval(
                "SELECT MAX(version) FROM profile_versions WHERE user_id = $1", user_id
            )
            if int(latest or 0) != base_version:
                return False
            await tx.execute(
                "INSERT INTO profile_versions (user_id, version, key_id, nonce, ciphertext,"
                " device_id, create_us) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                user_id,
                sealed.version,
                sealed.key_id,
                sealed.nonce,
                sealed.ciphertext,
                device_id,
                now_us,
            )
            await tx.execute(
                "DELETE FROM profile_versions WHERE user_id = $1 AND version <= $2",
                user_id,
                sealed.version - keep,
            )
        return True

    async def key_in_use(self, user_id: int, key_id: str) -> bool:
        found = await self._pool.fetchval(
            "SELECT 1 FROM profile_versions WHERE user_id = $1 AND key_id = $2 LIMIT 1",
            user_id,
            key_id,
        )
        return found is not None

    async def users_with_versions(self) -> set[int]:
        rows = await self._pool.fetch("SELECT DISTINCT user_id FROM profile_versions")
        return {int(r[0]) for r in rows}

    async def counts(self) -> tuple[int, int]:
        rows = await self._pool.fetch(
            "SELECT COUNT(*), COUNT(DISTINCT user_id) FROM profile_versions"
        )
        return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)

    async def erase_user(self, user_id: int) -> None:
        # PostgreSQL has no secure_delete: the freed tuples stay in their pages until VACUUM
        # prunes them; the erasure path vacuums the touched tables (PostgresPrivacyStorage.scrub)
        # and the ciphertext left in WAL and backups is unreadable once the key is shredded.
        async with self._pool.transaction() as tx:
            for table in ("profile_versions", "profile_feature_usage"):
                await tx.execute(f"DELETE FROM {table} WHERE user_id = $1", user_id)

    async def usage_scores(self, user_id: int) -> dict[str, tuple[float, int]]:
        rows = await self._pool.fetch(
            "SELECT feature, score, ref_us FROM profile_feature_usage WHERE user_id = $1",
            user_id,
        )
        return {str(f): (float(s), int(r)) for f, s, r in rows}

    async def save_usage(
        self, user_id: int, scores: dict[str, tuple[float, int]], dropped: list[str]
    ) -> None:
        async with self._pool.transaction() as tx:
            if scores:
                await tx.executemany(
                    "INSERT INTO profile_feature_usage (user_id, feature, score, ref_us)"
                    " VALUES ($1, $2, $3, $4) ON CONFLICT (user_id, feature)"
                    " DO UPDATE SET score = excluded.score, ref_us = excluded.ref_us",
                    [(user_id, f, *scores[f]) for f in sorted(scores)],
                )
            if dropped:
                await tx.execute(
                    "DELETE FROM profile_feature_usage WHERE user_id = $1"
                    " AND feature = ANY($2::text[])",
                    user_id,
                    list(dropped),
                )

"""PostgreSQL storage of the nudge model registry (tables nudge_models, nudge_model_promoted;
see pulsesync.server.storage.models): one registry for every replica."""

from __future__ import annotations

from collections.abc import Sequence

from pulsesync.server.storage.models import Promoted, StoredModel
from pulsesync.server.storage.postgres.pool import Connection, PostgresPool


async def _lock(conn: Connection) -> None:
    # Writers of new versions take turns (training and importing are rare operator's
    # commands); readers, every replica's per-tick check included, are not blocked.
    await conn.execute("LOCK TABLE nudge_models IN SHARE ROW EXCLUSIVE MODE")


class PostgresModelStorage:
    """`ModelStorage` over PostgreSQL."""

    def __init__(self, pool: PostgresPool) -> None:
        self._pool = pool

    async def versions(self) -> list[int]:
        rows = await self._pool.fetch("SELECT version FROM nudge_models ORDER BY version")
        return [int(r[0]) for r in rows]

    async def meta(self, version: int) -> str | None:
        found = await self._pool.fetchval(
            "SELECT meta FROM nudge_models WHERE version = $1", version
        )
        return None if found is None else str(found)

    async def get(self, version: int) -> StoredModel | None:
        rows = await self._pool.fetch(
            "SELECT version, create_us, meta, model FROM nudge_models WHERE version = $1",
            version,
        )
        if not rows:
            return None
        r = rows[0]
        return StoredModel(int(r[0]), int(r[1]), str(r[2]), bytes(r[3]))

    async def add(self, meta_json: str, model: bytes, create_us: int) -> int:
        async with self._pool.transaction() as conn:
            await _lock(conn)
            version = await conn.fetchval(
                "INSERT INTO nudge_models (version, create_us, meta, model)"
                " SELECT coalesce(max(version), 0) + 1, $1, $2, $3 FROM nudge_models"
                " RETURNING version",
                create_us,
                meta_json,
                model,
            )
        return int(version)

    async def set_meta(self, version: int, meta_json: str) -> bool:
        status = await self._pool.execute(
            "UPDATE nudge_models SET meta = $1 WHERE version = $2", meta_json, version
        )
        return status == "UPDATE 1"

    async def promote(self, version: int, evaluation_json: str, promote_us: int) -> bool:
        status = await self._pool.execute(
            "INSERT INTO nudge_model_promoted (slot, version, promote_us, evaluation)"
            " SELECT 1, version, $1, $2 FROM nudge_models WHERE version = $3"
            " ON CONFLICT (slot) DO UPDATE SET version = excluded.version,"
            " promote_us = excluded.promote_us, evaluation = excluded.evaluation",
            promote_us,
            evaluation_json,
            version,
        )
        return status == "INSERT 0 1"

    async def promoted(self) -> Promoted | None:
        rows = await self._pool.fetch(
            "SELECT version, promote_us, evaluation FROM nudge_model_promoted WHERE slot = 1"
        )
        if not rows:
            return None
        r = rows[0]
        return Promoted(int(r[0]), int(r[1]), str(r[2]))

    async def import_models(self, models: Sequence[StoredModel], promoted: Promoted | None) -> bool:
        async with self._pool.transaction() as conn:
            await _lock(conn)
            if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM nudge_models)"):
                return False
            await conn.executemany(
                "INSERT INTO nudge_models (version, create_us, meta, model)"
                " VALUES ($1, $2, $3, $4)",
                [(m.version, m.create_us, m.meta_json, m.model) for m in models],
            )
            if promoted is not None:
                await conn.execute(
                    "INSERT INTO nudge_model_promoted (slot, version, promote_us, evaluation)"
                    " VALUES (1, $1, $2, $3)",
                    promoted.version,
                    promoted.promote_us,
                    promoted.evaluation_json,
                )
        return True

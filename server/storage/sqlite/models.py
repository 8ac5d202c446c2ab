"""SQLite storage of the nudge model registry (tables nudge_models, nudge_model_promoted; see
pulsesync.server.storage.models)."""

from __future__ import annotations

from collections.abc import Sequence

from pulsesync.server.storage.db import Database
from pulsesync.server.storage.models import Promoted, StoredModel


class SqliteModelStorage:
    """`ModelStorage` over the server's database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def versions(self) -> list[int]:
        async with self._db.reader.execute(
            "SELECT version FROM nudge_models ORDER BY version"
        ) as c:
            return [int(r[0]) for r in await c.fetchall()]

    async def meta(self, version: int) -> str | None:
        async with self._db.reader.execute(
            "SELECT meta FROM nudge_models WHERE version = ?", (version,)
        ) as c:
            row = await c.fetchone()
        return None if row is None else str(row[0])

    async def get(self, version: int) -> StoredModel | None:
        async with self._db.reader.execute(
            "SELECT version, create_us, meta, model FROM nudge_models WHERE version = ?",
            (version,),
        ) as c:
            row = await c.fetchone()
        if row is None:
            return None
        return StoredModel(int(row[0]), int(row[1]), str(row[2]), bytes(row[3]))

    async def add(self, meta_json: str, model: bytes, create_us: int) -> int:
        # The write transaction serializes trainers (of every process on this file).
        async with self._db.transaction() as tx:
            async with tx.execute("SELECT coalesce(max(version), 0) + 1 FROM nudge_models") as c:
                row = await c.fetchone()
            assert row is not None
            version = int(row[0])
            await tx.execute(
                "INSERT INTO nudge_models (version, create_us, meta, model) VALUES (?, ?, ?, ?)",
                (version, create_us, meta_json, model),
            )
        return version

    async def set_meta(self, version: int, meta_json: str) -> bool:
        async with self._db.transaction() as tx:
            cur = await tx.execute(
                "UPDATE nudge_models SET meta = ? WHERE version = ?", (meta_json, version)
            )
            return cur.rowcount == 1

    async def promote(self, version: int, evaluation_json: str, promote_us: int) -> bool:
        async with self._db.transaction() as tx:
            cur = await tx.execute(
                "INSERT INTO nudge_model_promoted (slot, version, promote_us, evaluation)"
                " SELECT 1, version, ?, ? FROM nudge_models WHERE version = ?"
                " ON CONFLICT (slot) DO UPDATE SET version = excluded.version,"
                " promote_us = excluded.promote_us, evaluation = excluded.evaluation",
                (promote_us, evaluation_json, version),
            )
            return cur.rowcount == 1

    async def promoted(self) -> Promoted | None:
        async with self._db.reader.execute(
            "SELECT version, promote_us, evaluation FROM nudge_model_promoted WHERE slot = 1"
        ) as c:
            row = await c.fetchone()
        return None if row is None else Promoted(int(row[0]), int(row[1]), str(row[2]))

    async def import_models(self, models: Sequence[StoredModel], promoted: Promoted | None) -> bool:
        async with self._db.transaction() as tx:
            async with tx.execute("SELECT 1 FROM nudge_models LIMIT 1") as c:
                if await c.fetchone() is not None:
                    return False
            await tx.executemany(
                "INSERT INTO nudge_models (version, create_us, meta, model) VALUES (?, ?, ?, ?)",
                [(m.version, m.create_us, m.meta_json, m.model) for m in models],
            )
            if promoted is not None:
                await tx.execute(
                    "INSERT INTO nudge_model_promoted (slot, version, promote_us, evaluation)"
                    " VALUES (1, ?, ?, ?)",
                    (promoted.version, promoted.promote_us, promoted.evaluation_json),
                )
        return True

"""SQLite implementation of the consent storage seam."""

from __future__ import annotations

from pulsesync.server.storage.consent import ConsentEntry
from pulsesync.server.storage.db import Database


class SqliteConsentStorage:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def entries(self, user_id: int) -> list[ConsentEntry]:
        async with self._db.reader.execute(
            "SELECT entry_id, user_id, category, granted, change_us, policy_version, device_id"
            " FROM consent_ledger WHERE user_id = ? ORDER BY entry_id",
            (user_id,),
        ) as c:
            return [
                ConsentEntry(int(e), int(u), int(cat), bool(g), int(t), str(p), str(d))
                for e, u, cat, g, t, p, d in await c.fetchall()
            ]

    async def append(
        self,
        user_id: int,
        category: int,
        granted: bool,
        policy_version: str,
        device_id: str,
        change_us: int,
    ) -> int:
        async with self._db.transaction() as tx:
            cur = await tx.execute(
                "INSERT INTO consent_ledger"
                " (user_id, category, granted, policy_version, device_id, change_us)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (user_id, category, int(granted), policy_version, device_id, change_us),
            )
        assert cur.lastrowid is not None
        return cur.lastrowid

    async def last_entry_id(self) -> int:
        async with self._db.reader.execute(
            "SELECT COALESCE(MAX(entry_id), 0) FROM consent_ledger"
        ) as c:
            row = await c.fetchone()
        return int(row[0]) if row else 0

    async def entries_after(self, entry_id: int) -> list[tuple[int, int]]:
        async with self._db.reader.execute(
            "SELECT entry_id, user_id FROM consent_ledger WHERE entry_id > ? ORDER BY entry_id",
            (entry_id,),
        ) as c:
            return [(int(r[0]), int(r[1])) for r in await c.fetchall()]

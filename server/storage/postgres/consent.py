"""PostgreSQL implementation of the consent storage seam (the append-only consent ledger).

entry_id comes from an identity column, whose values are handed out in order but, with several
writers, could commit out of order; `entries_after` is how every replica follows the ledger,
and it would skip an entry whose lower id committed after a higher one was read. So an append
takes a transaction-level advisory lock before its id is drawn: appends commit one at a time,
in id order. Consent changes are rare (a person's choice), so the lock costs nothing that counts.
"""

from __future__ import annotations

from typing import Final

from pulsesync.server.storage.consent import ConsentEntry
from pulsesync.server.storage.postgres.pool import PostgresPool

# The advisory lock key that orders ledger appends ("consent" in ASCII).
APPEND_LOCK: Final = 0x636F6E73656E74


class PostgresConsentStorage:
    def __init__(self, pool: PostgresPool) -> None:
        self._pool = pool

    async def entries(self, user_id: int) -> list[ConsentEntry]:
        rows = await self._pool.fetch(
            "SELECT entry_id, user_id, category, granted, change_us, policy_version, device_id"
            " FROM consent_ledger WHERE user_id = $1 ORDER BY entry_id",
            user_id,
        )
        return [
            ConsentEntry(int(e), int(u), int(cat), bool(g), int(t), str(p), str(d))
            for e, u, cat, g, t, p, d in rows
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
        async with self._pool.transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK)
            entry_id = await conn.fetchval(
                "INSERT INTO consent_ledger"
                " (user_id, category, granted, policy_version, device_id, change_us)"
                " VALUES ($1, $2, $3, $4, $5, $6) RETURNING entry_id",
                user_id,
                category,
                int(granted),
                policy_version,
                device_id,
                change_us,
            )
        return int(entry_id)

    async def last_entry_id(self) -> int:
        return int(
            await self._pool.fetchval("SELECT coalesce(max(entry_id), 0) FROM consent_ledger")
        )

    async def entries_after(self, entry_id: int) -> list[tuple[int, int]]:
        rows = await self._pool.fetch(
            "SELECT entry_id, user_id FROM consent_ledger WHERE entry_id > $1 ORDER BY entry_id",
            entry_id,
        )
        return [(int(r[0]), int(r[1])) for r in rows]

"""SQLite storage of first answers to calls with a request_id (table idempotency_records), and
the claims that make one caller carry a call out (see pulsesync.server.storage.idempotency)."""

from __future__ import annotations

from pulsesync.server.storage.db import Database
from pulsesync.server.storage.idempotency import Claim, StoredAnswer


class SqliteIdempotencyStorage:
    """`IdempotencyStorage` over the server's database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def get(self, handle: bytes, now_us: int) -> StoredAnswer | None:
        async with self._db.reader.execute(
            "SELECT method, request_hash, nonce, ciphertext FROM idempotency_records"
            " WHERE lookup_key = ? AND expire_us > ? AND length(ciphertext) > 0",
            (handle, now_us),
        ) as c:
            row = await c.fetchone()
        if row is None:
            return None
        return StoredAnswer(str(row[0]), bytes(row[1]), bytes(row[2]), bytes(row[3]))

    async def claim(
        self,
        handle: bytes,
        claim_id: bytes,
        *,
        method: str,
        fingerprint: bytes,
        now_us: int,
        expire_us: int,
    ) -> Claim:
        # The write transaction serializes claimers (of every process on this file).
        async with self._db.transaction() as tx:
            async with tx.execute(
                "SELECT method, request_hash, nonce, ciphertext FROM idempotency_records"
                " WHERE lookup_key = ? AND expire_us > ?",
                (handle, now_us),
            ) as c:
                row = await c.fetchone()
            if row is not None:
                if not row[3]:
                    return Claim()  # another caller's live claim
                return Claim(
                    answer=StoredAnswer(str(row[0]), bytes(row[1]), bytes(row[2]), bytes(row[3]))
                )
            await tx.execute(
                "INSERT OR REPLACE INTO idempotency_records (lookup_key, user_id, method,"
                " request_hash, nonce, ciphertext, create_us, expire_us)"
                " VALUES (?, NULL, ?, ?, ?, x'', ?, ?)",
                (handle, method, fingerprint, claim_id, now_us, expire_us),
            )
        return Claim(held=True)

    async def release(self, handle: bytes, claim_id: bytes) -> None:
        async with self._db.transaction() as tx:
            await tx.execute(
                "DELETE FROM idempotency_records WHERE lookup_key = ? AND nonce = ?"
                " AND length(ciphertext) = 0",
                (handle, claim_id),
            )

    async def put(
        self,
        handle: bytes,
        answer: StoredAnswer,
        *,
        user_id: int | None,
        now_us: int,
        expire_us: int,
    ) -> None:
        async with self._db.transaction() as tx:
            # Expired answers are useless; the index on expire_us makes this cost what it
            # removes, so the table stays the size of one retry window of calls.
            await tx.execute("DELETE FROM idempotency_records WHERE expire_us <= ?", (now_us,))
            await tx.execute(
                "INSERT OR REPLACE INTO idempotency_records (lookup_key, user_id, method,"
                " request_hash, nonce, ciphertext, create_us, expire_us)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    handle,
                    user_id,
                    answer.method,
                    answer.fingerprint,
                    answer.nonce,
                    answer.ciphertext,
                    now_us,
                    expire_us,
                ),
            )

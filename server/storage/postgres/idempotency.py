"""PostgreSQL storage of first answers to calls with a request_id (table idempotency_records),
and the claims that let one replica carry out a call that several receive at once."""

from __future__ import annotations

from pulsesync.server.storage.idempotency import Claim, StoredAnswer
from pulsesync.server.storage.postgres.pool import PostgresPool


class PostgresIdempotencyStorage:
    """`IdempotencyStorage` over PostgreSQL."""

    def __init__(self, pool: PostgresPool) -> None:
        self._pool = pool

    async def get(self, handle: bytes, now_us: int) -> StoredAnswer | None:
        rows = await self._pool.fetch(
            "SELECT method, request_hash, nonce, ciphertext FROM idempotency_records"
            " WHERE lookup_key = $1 AND expire_us > $2 AND octet_length(ciphertext) > 0",
            handle,
            now_us,
        )
        if not rows:
            return None
        row = rows[0]
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
        # One statement decides between concurrent claimers: the primary key makes the
        # second INSERT wait for the first one's commit, then find its row. Only a row that
        # expired (an old answer, or the claim of a replica that died) is taken over.
        taken = await self._pool.fetchval(
            "INSERT INTO idempotency_records (lookup_key, user_id, method, request_hash,"
            " nonce, ciphertext, create_us, expire_us)"
            " VALUES ($1, NULL, $2, $3, $4, ''::bytea, $5, $6)"
            " ON CONFLICT (lookup_key) DO UPDATE SET user_id = NULL, method = excluded.method,"
            " request_hash = excluded.request_hash, nonce = excluded.nonce,"
            " ciphertext = excluded.ciphertext, create_us = excluded.create_us,"
            " expire_us = excluded.expire_us"
            " WHERE idempotency_records.expire_us <= excluded.create_us"
            " RETURNING true",
            handle,
            method,
            fingerprint,
            claim_id,
            now_us,
            expire_us,
        )
        if taken:
            return Claim(held=True)
        # Held by a live row: its answer, or another caller's claim (or, if that row was
        # released or answered and expired just now, nothing: the caller asks again).
        return Claim(answer=await self.get(handle, now_us))

    async def release(self, handle: bytes, claim_id: bytes) -> None:
        await self._pool.execute(
            "DELETE FROM idempotency_records WHERE lookup_key = $1 AND nonce = $2"
            " AND octet_length(ciphertext) = 0",
            handle,
            claim_id,
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
        async with self._pool.transaction() as conn:
            # Expired answers are useless; the index on expire_us makes this cost what it
            # removes, so the table stays the size of one retry window of calls.
            await conn.execute("DELETE FROM idempotency_records WHERE expire_us <= $1", now_us)
            await conn.execute(
                "INSERT INTO idempotency_records (lookup_key, user_id, method,"
                " request_hash, nonce, ciphertext, create_us, expire_us)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                " ON CONFLICT (lookup_key) DO UPDATE SET user_id = excluded.user_id,"
                " method = excluded.method, request_hash = excluded.request_hash,"
                " nonce = excluded.nonce, ciphertext = excluded.ciphertext,"
                " create_us = excluded.create_us, expire_us = excluded.expire_us",
                handle,
                user_id,
                answer.method,
                answer.fingerprint,
                answer.nonce,
                answer.ciphertext,
                now_us,
                expire_us,
            )

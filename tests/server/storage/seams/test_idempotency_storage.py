"""The idempotency storage seam behaves the same on SQLite and PostgreSQL: claims, answers and
their expiry (what lets one replica carry out a call several receive at once)."""

from __future__ import annotations

import asyncio

from pulsesync.server.storage.idempotency import Claim, IdempotencyStorage, StoredAnswer
from pulsesync.server.storage.postgres.idempotency import PostgresIdempotencyStorage
from pulsesync.server.storage.sqlite.idempotency import SqliteIdempotencyStorage
from tests.support.storage_backends import Backend

HANDLE = b"h" * 32
ANSWER = StoredAnswer("DeviceService.RevokeDevice", b"f" * 32, b"n" * 12, b"sealed-answer")


def storage_of(b: Backend) -> IdempotencyStorage:
    if b.pool is not None:
        return PostgresIdempotencyStorage(b.pool)
    assert b.db is not None
    return SqliteIdempotencyStorage(b.db)


async def claim(s: IdempotencyStorage, claim_id: bytes, now: int, until: int = 1_000) -> Claim:
    return await s.claim(
        HANDLE, claim_id, method=ANSWER.method, fingerprint=ANSWER.fingerprint, now_us=now,
        expire_us=until,
    )  # fmt: skip


async def test_one_claimer_holds_a_handle_until_its_answer_or_release(
    storage_backend: Backend,
) -> None:
    s = storage_of(storage_backend)
    assert await claim(s, b"first-claim1", 10) == Claim(held=True)
    # Another caller finds the live claim: neither held nor answered (it waits).
    assert await claim(s, b"other-claim1", 20) == Claim()
    assert await s.get(HANDLE, 20) is None  # a claim is not an answer
    # Only the holder's release drops it.
    await s.release(HANDLE, b"other-claim1")
    assert await claim(s, b"other-claim1", 30) == Claim()
    await s.release(HANDLE, b"first-claim1")
    assert await claim(s, b"other-claim1", 40) == Claim(held=True)
    # The answer replaces the claim; from then on every claimer gets it, and a release
    # (a late one of the claimer) leaves it.
    await s.put(HANDLE, ANSWER, user_id=None, now_us=50, expire_us=5_000)
    assert await claim(s, b"third-claim1", 60) == Claim(answer=ANSWER)
    await s.release(HANDLE, b"other-claim1")
    assert await s.get(HANDLE, 70) == ANSWER


async def test_an_expired_claim_or_answer_is_taken_over(storage_backend: Backend) -> None:
    s = storage_of(storage_backend)
    assert await claim(s, b"dead-replica", 10, until=100) == Claim(held=True)
    assert await claim(s, b"retry-claim1", 99) == Claim()
    # The claimer died: once its claim expired, the next claimer holds the handle.
    assert await claim(s, b"retry-claim1", 100, until=300) == Claim(held=True)
    await s.put(HANDLE, ANSWER, user_id=None, now_us=200, expire_us=400)
    assert await claim(s, b"late-claim12", 399) == Claim(answer=ANSWER)
    assert await claim(s, b"late-claim12", 400) == Claim(held=True)  # the window is over


async def test_concurrent_claimers_hold_a_handle_once(storage_backend: Backend) -> None:
    s = storage_of(storage_backend)
    found = await asyncio.gather(*(claim(s, bytes([i]) * 12, 10) for i in range(8)))
    assert sum(c.held for c in found) == 1
    assert all(c.answer is None for c in found)

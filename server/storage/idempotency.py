"""The storage seam for idempotent retries (AIP-155 request_id): sealed first answers with expiry,
and claims that make one caller, on whichever replica, carry a call out while the others wait.

The engine (`pulsesync.server.idempotency`) derives every value stored here; storage only keeps
and finds them. Both backends implement `IdempotencyStorage`.

A claim is a row of the same table under the same handle, with an empty ciphertext (an answer
never has one: AES-GCM adds a 16-byte tag), the claimer's random id in the nonce column, no
person, and the claim's expiry as its expiry: the primary key lets one caller hold it, the
answer replaces it, and a claimer that died leaves a row that expires like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """A first answer as stored: the request's fingerprint and the sealed response."""

    method: str
    fingerprint: bytes
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True, slots=True)
class Claim:
    """What claiming a handle found: its stored answer, or whether the caller now holds it
    (neither: another caller holds a live claim and is carrying the call out)."""

    answer: StoredAnswer | None = None
    held: bool = False


class IdempotencyStorage(Protocol):
    """First answers by handle, each kept until its expiry."""

    async def get(self, handle: bytes, now_us: int) -> StoredAnswer | None:
        """The answer stored under handle, unless there is none or it expired by now_us."""
        ...

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
        """Atomically: the live answer under handle if there is one; else the handle claimed
        for claim_id until expire_us (held) unless another live claim holds it (not held)."""
        ...

    async def release(self, handle: bytes, claim_id: bytes) -> None:
        """Drop claim_id's claim on handle (the call failed: a retry decides afresh); an
        answer, or another caller's claim, is left alone."""
        ...

    async def put(
        self,
        handle: bytes,
        answer: StoredAnswer,
        *,
        user_id: int | None,
        now_us: int,
        expire_us: int,
    ) -> None:
        """Store answer under handle until expire_us (replacing an expired one, or the claim
        of the call it answers), and drop rows that expired by now_us. user_id ties it to a
        person, for erasure."""
        ...

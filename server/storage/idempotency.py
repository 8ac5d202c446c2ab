"""The storage seam for idempotent retries (AIP-155 request_id): sealed first answers with expiry.

The engine (`pulsesync.server.idempotency`) derives every value stored here; storage only keeps
and finds them. A second backend implements `IdempotencyStorage`.
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


class IdempotencyStorage(Protocol):
    """First answers by handle, each kept until its expiry."""

    async def get(self, handle: bytes, now_us: int) -> StoredAnswer | None:
        """The answer stored under handle, unless there is none or it expired by now_us."""
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
        """Store answer under handle until expire_us (replacing an expired one), and drop
        answers that expired by now_us. user_id ties it to a person, for erasure."""
        ...

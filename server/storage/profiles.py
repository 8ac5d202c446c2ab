"""The profile domain's storage seam: sealed profile versions and the adaptive-layout usage scores.

The storage sees only ciphertext: sealing and opening happen in the profile store, under keys
that live in the key vault (`pulsesync.server.storage.keys`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class SealedVersion:
    version: int
    key_id: str
    nonce: bytes
    ciphertext: bytes


class ProfileStorage(Protocol):
    async def latest(self, user_id: int) -> SealedVersion | None: ...

    async def version(self, user_id: int, version: int) -> SealedVersion | None: ...

    async def versions_after(self, user_id: int, after: int) -> list[SealedVersion]:
        """Retained versions newer than after, oldest first."""
        ...

    async def append(
        self,
        user_id: int,
        base_version: int,
        sealed: SealedVersion,
        device_id: str,
        now_us: int,
        keep: int,
    ) -> bool:
        """In one transaction: if the latest version is still base_version, add sealed and
        drop versions older than the newest `keep`. False (nothing written) if another writer
        committed first (compare-and-set lost)."""
        ...

    async def key_in_use(self, user_id: int, key_id: str) -> bool:
        """Whether any retained version of the user is sealed under key_id."""
        ...

    async def users_with_versions(self) -> set[int]: ...

    async def counts(self) -> tuple[int, int]:
        """(versions, people) stored."""
        ...

    async def erase_user(self, user_id: int) -> None:
        """Delete the user's versions and usage scores, overwriting the freed space."""
        ...

    async def usage_scores(self, user_id: int) -> dict[str, tuple[float, int]]:
        """feature -> (score, reference time in µs)."""
        ...

    async def save_usage(
        self, user_id: int, scores: dict[str, tuple[float, int]], dropped: list[str]
    ) -> None:
        """Upsert these features' scores and delete the dropped ones, in one transaction."""
        ...

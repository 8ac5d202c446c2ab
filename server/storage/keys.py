"""The key vault's storage seam: each person's wrapped profile data key, apart from the database.

Kept apart so that destroying one person's key reaches every backup of the database (which
holds ciphertext only); see `pulsesync.server.storage.sqlite.keys` for the SQLite file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A data key wrapped by the KEK named kek_id."""

    kek_id: str
    blob: bytes


@dataclass(frozen=True, slots=True)
class VaultKey:
    """One person's data key as stored: wrapped, never in the clear."""

    user_id: int
    key_id: str
    wrapped: WrappedKey
    create_us: int
    wrap_us: int


@dataclass(frozen=True, slots=True)
class ShredReport:
    """Whether the vault's log could be emptied after a deletion."""

    deleted: bool
    checkpoint_busy: bool
    vault_bytes_after: int  # file plus write-ahead log


class KeyVaultStorage(Protocol):
    # Where the vault lives, for operators' messages: its file, or its URL without password.
    @property
    def path(self) -> Path | str: ...

    async def get(self, user_id: int) -> VaultKey | None: ...

    async def all(self) -> list[VaultKey]: ...

    async def kek_counts(self) -> dict[str, int]:
        """How many data keys each key-encryption key wraps."""
        ...

    async def user_ids(self) -> set[int]: ...

    async def add(self, key: VaultKey) -> bool:
        """Store a new data key durably; False if the person already has one."""
        ...

    async def replace_wrapped(self, updates: list[tuple[VaultKey, WrappedKey]], now_us: int) -> int:
        """Re-wrap keys in one transaction (a row changed meanwhile is left); rows updated."""
        ...

    async def shred(self, user_id: int) -> ShredReport:
        """Delete the person's key so that no copy of it remains in the vault's files."""
        ...

    async def discard(self, user_id: int, key_id: str) -> bool:
        """Delete one key if it is still the person's (it protected nothing yet)."""
        ...

    async def compact(self) -> bool:
        """Drop every freed copy of old keys (after a rotation); whether that stayed busy."""
        ...

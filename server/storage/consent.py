"""The consent domain's storage seam: the append-only consent ledger."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ConsentEntry:
    """One ledger entry: a grant or a withdrawal of one category."""

    entry_id: int
    user_id: int
    category: int
    granted: bool
    change_us: int
    policy_version: str
    device_id: str


class ConsentStorage(Protocol):
    async def entries(self, user_id: int) -> list[ConsentEntry]:
        """The user's ledger, oldest first."""
        ...

    async def append(
        self,
        user_id: int,
        category: int,
        granted: bool,
        policy_version: str,
        device_id: str,
        change_us: int,
    ) -> int:
        """Append one entry in its own transaction; its entry id."""
        ...

    async def last_entry_id(self) -> int:
        """The highest entry id in the ledger (0 when empty)."""
        ...

    async def entries_after(self, entry_id: int) -> list[tuple[int, int]]:
        """(entry id, user id) of every entry after entry_id, oldest first."""
        ...

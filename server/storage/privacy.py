"""The privacy domain's storage seam: every person's rows (found from the schema), erasure with
its receipt and audit entry in one transaction, export snapshots, summary counts, retention.

Person-held tables are discovered, not listed: a component that adds a table with a `user_id`
column is exported, counted and erased without anyone remembering to register it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final, Protocol

USER_COLUMN: Final = "user_id"
# Columns never exported: credential hashes and key material. What they protect is exported
# in readable form by the owning component (e.g. the decrypted profile).
_SECRET_COLUMN: Final = re.compile(
    r"(_hash$|^hash$|secret|^token|_token$|wrapped|^key$|_key$|nonce|ciphertext)"
)
# Identifiers taken from the schema (table and column names) before they are quoted into SQL.
_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Tables that record nudges sent, in order of preference, and the column marking delivery.
_NUDGE_TABLES: Final = ("nudges", "nudge_deliveries", "nudge_decisions")
_DELIVERY_COLUMNS: Final = ("delivered_us", "deliver_us", "sent_us", "send_us")


def quote(name: str) -> str:
    """An identifier from the schema, quoted for SQL (names are checked, never user input)."""
    if not _NAME.match(name):
        raise ValueError(f"unexpected identifier in schema: {name!r}")
    return f'"{name}"'


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    decl_type: str

    @property
    def is_secret(self) -> bool:
        return bool(_SECRET_COLUMN.search(self.name.lower()))


@dataclass(frozen=True, slots=True)
class UserTable:
    """A table with a user_id column and its columns in declaration order."""

    name: str
    columns: tuple[Column, ...]

    @property
    def exported_columns(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if not c.is_secret)

    @property
    def omitted_columns(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.is_secret)

    def has(self, column: str) -> bool:
        return any(c.name == column for c in self.columns)


@dataclass(frozen=True, slots=True)
class PersonRow:
    user_id: int
    name: str
    create_us: int


@dataclass(frozen=True, slots=True)
class AuditRow:
    at_us: int
    action: str
    actor: str
    subject: str
    detail_json: str


def audit_params(row: AuditRow) -> tuple[int, str, str, str, str]:
    """The audit row as the parameters of its INSERT, in column order."""
    return (row.at_us, row.action, row.actor, row.subject, row.detail_json)


@dataclass(frozen=True, slots=True)
class StoredAuditRow:
    audit_id: int
    row: AuditRow


@dataclass(frozen=True, slots=True)
class ReceiptRow:
    receipt_id: str
    erase_us: int
    subject_hash: str
    deleted_counts_json: str
    signature: str


@dataclass(frozen=True, slots=True)
class HeldTable:
    """A table whose rows count toward a consent category in the summary."""

    name: str
    time_column: str
    device_column: str | None  # device_pk (INTEGER) or device_id (TEXT)


@dataclass(frozen=True, slots=True)
class HeldGroup:
    """One table's rows of a person for one device (device None: not recorded)."""

    table: str
    device: int | str | None
    count: int
    first_us: int
    last_us: int


@dataclass(frozen=True, slots=True)
class EventGroup:
    kind: int
    device_pk: int
    count: int
    first_us: int
    last_us: int


@dataclass(frozen=True, slots=True)
class DeviceSeen:
    device_pk: int
    device_id: str
    last_seen_us: int | None


@dataclass(frozen=True, slots=True)
class SummaryRows:
    events: list[EventGroup]
    devices: list[DeviceSeen]
    record_counts: dict[str, int]
    held: list[HeldGroup]
    nudges_sent: int


@dataclass(frozen=True, slots=True)
class ScrubReport:
    """What making freed bytes unrecoverable cost."""

    vacuum_seconds: float
    checkpoint_seconds: float
    checkpoint_busy: bool
    db_bytes_before: int  # database file plus WAL
    db_bytes_after: int


# Called inside the erase transaction with the rows deleted per table; returns what to record
# in the same transaction. Synchronous: nothing may wait while the write lock is held.
ErasureRecords = Callable[[dict[str, int]], tuple[ReceiptRow, AuditRow]]


class PrivacyStorage(Protocol):
    async def person(self, user_id: int) -> PersonRow | None: ...

    async def user_ids(self) -> list[int]: ...

    async def user_tables(self) -> list[UserTable]:
        """Tables holding per-person rows; `users` last (others may reference it)."""
        ...

    async def erase_rows(
        self, user_id: int, tables: list[UserTable], records: ErasureRecords
    ) -> tuple[ReceiptRow, AuditRow]:
        """In one transaction, overwriting freed space: delete the person's rows from every
        table (references checked at commit), then store the receipt and audit entry that
        `records` makes from the counts."""
        ...

    async def sweep_rows(self, user_id: int, tables: list[UserTable]) -> int:
        """Delete rows of the person committed after erase_rows; how many."""
        ...

    async def scrub(self) -> ScrubReport | None:
        """Make freed pages unrecoverable (None where storage keeps no file of its own)."""
        ...

    async def append_audit(self, row: AuditRow) -> None: ...

    async def audit_entries(self, limit: int, action: str | None) -> list[StoredAuditRow]:
        """The newest entries first."""
        ...

    def export_rows(
        self, user_id: int, skip: frozenset[str]
    ) -> AsyncIterator[tuple[UserTable, dict[str, object] | None]]:
        """One consistent snapshot of the person's rows, table by table (except skip): each
        table's (table, None) first, then (table, row) for each row, exported columns only."""
        ...

    async def summary_rows(self, user_id: int, held: list[HeldTable]) -> SummaryRows: ...

    async def delete_events_before(self, user_id: int, cutoff_us: int, limit: int) -> int:
        """Delete at most limit of the person's events older than cutoff, in one transaction."""
        ...

    async def delete_quarantine_before(self, cutoff_us: int, limit: int) -> int: ...


def nudges_sent_source(present: dict[str, UserTable]) -> tuple[str, str] | None:
    """Where a person's sent nudges are counted: (quoted table, extra WHERE condition, "" for
    none) from the first nudge table present, or None when there is none."""
    for name in _NUDGE_TABLES:
        table = present.get(name)
        if table is None:
            continue
        column = next((c for c in _DELIVERY_COLUMNS if table.has(c)), None)
        return quote(name), f" AND {quote(column)} IS NOT NULL" if column else ""
    return None

"""The privacy audit log: who exported, erased or read a person's data, and when.

Entries name the person by a keyed pseudonym and carry counts and sizes only, so the log can
outlive an erasure without keeping anything of the person and never holds a secret.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from pulsesync.server.clock import Clock
from pulsesync.server.storage.privacy import AuditRow, PrivacyStorage

# Plenty for a person reading the log in a terminal; the table itself keeps everything.
DEFAULT_AUDIT_LIMIT: Final = 100

DetailValue = str | int | float | bool | None | list[str] | dict[str, int]


class Action(StrEnum):
    EXPORT = "export"
    ERASE = "erase"
    SUMMARY = "summary"
    CONSENT = "consent"
    RETENTION = "retention"


class Actor(StrEnum):
    DEVICE = "device"  # the person, through one of their paired devices
    ADMIN = "admin"  # an operator, through the `pulsesync` CLI
    SYSTEM = "system"  # the server on its own (retention)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    audit_id: int
    at_us: int
    action: str
    actor: str
    subject: str
    detail: dict[str, DetailValue]


class AuditLog:
    """Appends and lists audit entries."""

    def __init__(self, storage: PrivacyStorage, clock: Clock) -> None:
        self._storage = storage
        self._clock = clock

    async def record(
        self,
        action: Action,
        actor: Actor,
        subject: str,
        detail: Mapping[str, DetailValue] | None = None,
    ) -> None:
        """Append one entry (its own transaction)."""
        await self._storage.append_audit(self.row(action, actor, subject, detail))

    def row(
        self,
        action: Action,
        actor: Actor,
        subject: str,
        detail: Mapping[str, DetailValue] | None = None,
    ) -> AuditRow:
        """The entry as stored, to record inside a storage transaction (erasure)."""
        return AuditRow(
            self._clock.now_us(),
            action.value,
            actor.value,
            subject,
            json.dumps(dict(detail or {}), sort_keys=True),
        )

    async def entries(
        self, *, limit: int = DEFAULT_AUDIT_LIMIT, action: str | None = None
    ) -> list[AuditEntry]:
        """The newest entries first."""
        return [
            AuditEntry(
                e.audit_id,
                e.row.at_us,
                e.row.action,
                e.row.actor,
                e.row.subject,
                json.loads(e.row.detail_json),
            )
            for e in await self._storage.audit_entries(limit, action or None)
        ]

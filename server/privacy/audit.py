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
from pulsesync.server.storage.db import Database

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

    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    async def record(
        self,
        action: Action,
        actor: Actor,
        subject: str,
        detail: Mapping[str, DetailValue] | None = None,
    ) -> None:
        """Append one entry (its own transaction)."""
        async with self._db.transaction() as tx:
            await tx.execute(*self.insert(action, actor, subject, detail))

    def insert(
        self,
        action: Action,
        actor: Actor,
        subject: str,
        detail: Mapping[str, DetailValue] | None = None,
    ) -> tuple[str, tuple[int, str, str, str, str]]:
        """The INSERT statement and parameters, to run inside a caller's transaction."""
        return (
            "INSERT INTO privacy_audit (at_us, action, actor, subject, detail) VALUES (?, ?, ?, ?, ?)",
            (
                self._clock.now_us(),
                action.value,
                actor.value,
                subject,
                json.dumps(dict(detail or {}), sort_keys=True),
            ),
        )

    async def entries(
        self, *, limit: int = DEFAULT_AUDIT_LIMIT, action: str | None = None
    ) -> list[AuditEntry]:
        """The newest entries first."""
        sql = "SELECT audit_id, at_us, action, actor, subject, detail FROM privacy_audit"
        params: list[object] = []
        if action:
            sql += " WHERE action = ?"
            params.append(action)
        sql += " ORDER BY audit_id DESC LIMIT ?"
        params.append(limit)
        async with self._db.reader.execute(sql, params) as c:
            rows = await c.fetchall()
        return [
            AuditEntry(int(r[0]), int(r[1]), str(r[2]), str(r[3]), str(r[4]), json.loads(r[5]))
            for r in rows
        ]

"""The storage bundle: one object holding every domain's storage seam, and how to open it.

    async with open_storage(config) as storage:
        storage.identity, storage.consent, storage.profiles, storage.privacy, storage.nudges,
        storage.timeline

SQLite is the one backend today; another (a postgresql:// URL) implements the same Protocols
and is chosen here. The key vault is not in the bundle: it is bound to the database when the
profile store opens (`pulsesync.server.compose.open_profile_store`), and lives in its own file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from pulsesync.server.storage.consent import ConsentStorage
from pulsesync.server.storage.db import Database
from pulsesync.server.storage.idempotency import IdempotencyStorage
from pulsesync.server.storage.identity import IdentityStorage
from pulsesync.server.storage.nudges import NudgeStorage
from pulsesync.server.storage.privacy import PrivacyStorage
from pulsesync.server.storage.profiles import ProfileStorage
from pulsesync.server.storage.sqlite.consent import SqliteConsentStorage
from pulsesync.server.storage.sqlite.idempotency import SqliteIdempotencyStorage
from pulsesync.server.storage.sqlite.identity import SqliteIdentityStorage
from pulsesync.server.storage.sqlite.nudges import SqliteNudgeStorage
from pulsesync.server.storage.sqlite.privacy import SqlitePrivacyStorage
from pulsesync.server.storage.sqlite.profiles import SqliteProfileStorage
from pulsesync.server.storage.sqlite.timeline import SqliteTimelineStorage
from pulsesync.server.storage.timeline import TimelineStorage


@dataclass(frozen=True, slots=True)
class Storage:
    identity: IdentityStorage
    consent: ConsentStorage
    profiles: ProfileStorage
    privacy: PrivacyStorage
    nudges: NudgeStorage
    timeline: TimelineStorage
    idempotency: IdempotencyStorage
    # The SQLite database itself: the ingest writer process (the SQLite event writer) and the
    # key vault binding work on it directly.
    db: Database


def sqlite_storage(db: Database) -> Storage:
    """Every domain's SQLite storage over one open database."""
    return Storage(
        identity=SqliteIdentityStorage(db),
        consent=SqliteConsentStorage(db),
        profiles=SqliteProfileStorage(db),
        privacy=SqlitePrivacyStorage(db),
        nudges=SqliteNudgeStorage(db),
        timeline=SqliteTimelineStorage(db),
        idempotency=SqliteIdempotencyStorage(db),
        db=db,
    )


@asynccontextmanager
async def open_storage(path: Path) -> AsyncIterator[Storage]:
    """Migrate and open the database at path (DatabaseDamaged if it is damaged); closed on exit."""
    async with await Database.open(path) as db:
        yield sqlite_storage(db)

"""The storage bundle: one object holding every domain's storage seam, and how to open it.

    async with open_storage(config.database) as storage:
        storage.identity, storage.consent, storage.profiles, storage.privacy, storage.nudges,
        storage.timeline, storage.idempotency, storage.models

SQLite (a file path, the default) and PostgreSQL (a postgresql:// URL, see database_url)
implement the same Protocols; `open_storage` chooses by the database given. The key vault is not in the bundle: it is bound to the database when the
profile store opens (`pulsesync.server.compose.open_profile_store`), and lives in its own file.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pulsesync.server.storage.consent import ConsentStorage
from pulsesync.server.storage.database_url import Backend, DatabaseUrl
from pulsesync.server.storage.db import Database
from pulsesync.server.storage.idempotency import IdempotencyStorage
from pulsesync.server.storage.identity import IdentityStorage
from pulsesync.server.storage.models import ModelStorage
from pulsesync.server.storage.nudges import NudgeStorage
from pulsesync.server.storage.privacy import PrivacyStorage
from pulsesync.server.storage.profiles import ProfileStorage
from pulsesync.server.storage.sqlite.consent import SqliteConsentStorage
from pulsesync.server.storage.sqlite.idempotency import SqliteIdempotencyStorage
from pulsesync.server.storage.sqlite.identity import SqliteIdentityStorage
from pulsesync.server.storage.sqlite.models import SqliteModelStorage
from pulsesync.server.storage.sqlite.nudges import SqliteNudgeStorage
from pulsesync.server.storage.sqlite.privacy import SqlitePrivacyStorage
from pulsesync.server.storage.sqlite.profiles import SqliteProfileStorage
from pulsesync.server.storage.sqlite.timeline import SqliteTimelineStorage
from pulsesync.server.storage.timeline import TimelineStorage

if TYPE_CHECKING:
    from pulsesync.server.storage.postgres.pool import PostgresPool


@dataclass(frozen=True, slots=True)
class Storage:
    identity: IdentityStorage
    consent: ConsentStorage
    profiles: ProfileStorage
    privacy: PrivacyStorage
    nudges: NudgeStorage
    timeline: TimelineStorage
    idempotency: IdempotencyStorage
    # The nudge model registry: trained versions and the promoted one.
    models: ModelStorage
    # Where the TimelineService's reads go when not to the primary: a PostgreSQL hot standby
    # (--read-database). Everything else, the upload state and the nudges' outcomes included,
    # reads the primary, which never lags behind an ack.
    timeline_reads: TimelineStorage | None = None
    # The backend's own handle, for what works below the seams: on SQLite the database (the
    # ingest writer process and the key vault binding use it directly), on PostgreSQL the
    # pool (its event writer). Exactly one is set.
    db: Database | None = None
    pool: PostgresPool | None = None

    @property
    def backend(self) -> Backend:
        return "sqlite" if self.db is not None else "postgres"


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
        models=SqliteModelStorage(db),
        db=db,
    )


@asynccontextmanager
async def open_storage(
    database: Path | DatabaseUrl, read_database: DatabaseUrl | None = None
) -> AsyncIterator[Storage]:
    """Migrate and open the database (a SQLite path, or a parsed --database value); closed on
    exit. DatabaseDamaged if a SQLite file is damaged. On PostgreSQL, `read_database` names a
    hot standby the TimelineService reads from (opened read-only; not migrated: it replays the
    primary's schema)."""
    if isinstance(database, DatabaseUrl) and database.is_postgres:
        # Imported here: a SQLite-only deployment never loads the PostgreSQL driver.
        from pulsesync.server.storage.postgres.backend import postgres_storage
        from pulsesync.server.storage.postgres.migrate import migrate
        from pulsesync.server.storage.postgres.pool import PostgresPool

        assert database.dsn is not None
        async with contextlib.AsyncExitStack() as stack:
            pool = await stack.enter_async_context(await PostgresPool.open(database.dsn))
            await migrate(pool)
            reads = None
            if read_database is not None:
                assert read_database.dsn is not None
                reads = await stack.enter_async_context(
                    await PostgresPool.open(read_database.dsn, read_only=True)
                )
            yield postgres_storage(pool, reads)
        return
    if read_database is not None:
        raise ValueError("a read database (a PostgreSQL standby) needs a PostgreSQL database")
    path = database.path if isinstance(database, DatabaseUrl) else database
    assert path is not None
    async with await Database.open(path) as db:
        yield sqlite_storage(db)

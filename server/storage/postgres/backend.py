"""The storage bundle on PostgreSQL: every domain's PostgreSQL storage over one pool."""

from __future__ import annotations

from pulsesync.server.storage.backend import Storage
from pulsesync.server.storage.postgres.consent import PostgresConsentStorage
from pulsesync.server.storage.postgres.idempotency import PostgresIdempotencyStorage
from pulsesync.server.storage.postgres.identity import PostgresIdentityStorage
from pulsesync.server.storage.postgres.models import PostgresModelStorage
from pulsesync.server.storage.postgres.nudges import PostgresNudgeStorage
from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.server.storage.postgres.privacy import PostgresPrivacyStorage
from pulsesync.server.storage.postgres.profiles import PostgresProfileStorage
from pulsesync.server.storage.postgres.timeline import PostgresTimelineStorage


def postgres_storage(pool: PostgresPool, reads: PostgresPool | None = None) -> Storage:
    """Every domain's PostgreSQL storage over pool (migrated already); timeline reads from
    `reads` when given (a hot standby, see docs/scaling.md)."""
    return Storage(
        identity=PostgresIdentityStorage(pool),
        consent=PostgresConsentStorage(pool),
        profiles=PostgresProfileStorage(pool),
        privacy=PostgresPrivacyStorage(pool),
        nudges=PostgresNudgeStorage(pool),
        timeline=PostgresTimelineStorage(pool),
        timeline_reads=PostgresTimelineStorage(reads) if reads is not None else None,
        idempotency=PostgresIdempotencyStorage(pool),
        models=PostgresModelStorage(pool),
        db=None,
        pool=pool,
    )

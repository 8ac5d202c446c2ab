"""The storage bundle on PostgreSQL: every domain's PostgreSQL storage over one pool.

The profile, privacy and nudge domains live in their own modules of this package; a release
that lacks one cannot serve on PostgreSQL, and says which domain is missing when the database
is opened rather than failing on the first request that needs it.
"""

from __future__ import annotations

import importlib
from typing import Any

from pulsesync.server.storage.backend import Storage
from pulsesync.server.storage.postgres.consent import PostgresConsentStorage
from pulsesync.server.storage.postgres.idempotency import PostgresIdempotencyStorage
from pulsesync.server.storage.postgres.identity import PostgresIdentityStorage
from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.server.storage.postgres.timeline import PostgresTimelineStorage


class BackendIncomplete(RuntimeError):
    """A domain has no PostgreSQL storage in this release."""


def _domain(module: str, cls: str, pool: PostgresPool) -> Any:
    try:
        found = getattr(importlib.import_module(f"pulsesync.server.storage.postgres.{module}"), cls)
    except (ImportError, AttributeError):
        raise BackendIncomplete(
            f"this release has no PostgreSQL storage for the {module} domain ({cls}); "
            "use a SQLite database"
        ) from None
    return found(pool)


def postgres_storage(pool: PostgresPool) -> Storage:
    """Every domain's PostgreSQL storage over pool (migrated already); BackendIncomplete if a
    domain has none."""
    return Storage(
        identity=PostgresIdentityStorage(pool),
        consent=PostgresConsentStorage(pool),
        profiles=_domain("profiles", "PostgresProfileStorage", pool),
        privacy=_domain("privacy", "PostgresPrivacyStorage", pool),
        nudges=_domain("nudges", "PostgresNudgeStorage", pool),
        timeline=PostgresTimelineStorage(pool),
        idempotency=PostgresIdempotencyStorage(pool),
        db=None,
        pool=pool,
    )

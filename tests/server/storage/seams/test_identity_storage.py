"""The identity storage seam's shared secrets behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

from pulsesync.server.storage.identity import IdentityStorage
from pulsesync.server.storage.sqlite.identity import SqliteIdentityStorage
from tests.support.storage_backends import Backend


def _identity(b: Backend) -> IdentityStorage:
    if b.db is not None:
        return SqliteIdentityStorage(b.db)
    from pulsesync.server.storage.postgres.identity import PostgresIdentityStorage

    assert b.pool is not None
    return PostgresIdentityStorage(b.pool)


async def test_the_first_secret_stored_under_a_name_is_everyones(storage_backend: Backend) -> None:
    identity = _identity(storage_backend)
    assert await identity.shared_secret("page-token", b"first") == b"first"
    # Another replica starting later brings its own fresh secret and gets the stored one.
    assert await identity.shared_secret("page-token", b"second") == b"first"
    assert await identity.shared_secret("other", b"own") == b"own"

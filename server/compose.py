"""The composition root: every engine built from the storage bundle, clock, bus and config.

The server (`pulsesync.server.app`) and the offline admin commands build their parts here, so
the bus subscriptions and the erase/export hooks are wired in one visible place, the same way
for both.
"""

from __future__ import annotations

from pulsesync.server.clock import Clock
from pulsesync.server.config import ServerConfig
from pulsesync.server.profiles.crypto import AesGcmSealer, Sealer
from pulsesync.server.profiles.keys import DataKeys
from pulsesync.server.profiles.store import ProfileStore
from pulsesync.server.storage.db import Database
from pulsesync.server.storage.sqlite.profile_vault import open_vault
from pulsesync.server.storage.sqlite.profiles import SqliteProfileStorage


async def open_profile_store(
    config: ServerConfig, db: Database, clock: Clock, *, sealer: Sealer | None = None
) -> ProfileStore:
    """The profile store over a database: open (or create) the key vault bound to it and the
    key file, moving data keys out of a database of the previous layout, and check that both
    fit the database. `sealer` replaces AES-GCM only for the benchmark's baseline."""
    storage = SqliteProfileStorage(db)
    vault = await open_vault(config, db, clock.now_us())
    keys = await DataKeys.open(config.kek_file, vault, storage)
    return ProfileStore(storage, clock, keys, sealer or AesGcmSealer())

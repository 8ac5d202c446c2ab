"""Opening the key vault of a SQLite database: binding, refusals, upgrade from the old layout.

The database records which vault holds its data keys (`profile_vault`, one row with the
vault's random id). At start:

* vault missing: created (mode 0600) when the database has no profile ciphertext, or when the
  database is of the previous layout (keys in its `profile_keys` table, moved below); refused,
  naming both files, when there is ciphertext whose keys the vault held;
* vault present but another database's (ids differ): refused while there is ciphertext; a
  database without profiles adopts an empty vault, never one holding other people's keys;
* previous layout: every `profile_keys` row is copied as is (still wrapped) into the vault
  and made durable there, checked, then deleted from the database with `secure_delete` on,
  the table dropped, and the database compacted (VACUUM + TRUNCATE checkpoint) so no page of
  it keeps a wrapped key. An interrupted upgrade is redone on the next start: the copy keeps
  what the vault already holds, so it is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from pulsesync.server.config import ServerConfig
from pulsesync.server.storage.db import Database
from pulsesync.server.storage.keys import VaultKey, WrappedKey
from pulsesync.server.storage.sqlite.keys import KeyVault, KeyVaultError, compact_database
from pulsesync.server.storage.sqlite.profiles import secure_delete

log = logging.getLogger(__name__)

LEGACY_TABLE: Final = "profile_keys"
# Same as in migrations/0003_profiles.sql, for databases that applied its first layout.
_BINDING_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS profile_vault ("
    " singleton INTEGER PRIMARY KEY CHECK (singleton = 1),"
    " vault_id TEXT NOT NULL,"
    " bind_us INTEGER NOT NULL)"
)
_WHAT_TO_DO: Final = (
    "Restore the key vault from its backup and point --key-vault (or PULSESYNC_KEY_VAULT) at "
    "it; without it the stored profiles cannot be decrypted."
)


async def legacy_keys(db: Database) -> list[VaultKey] | None:
    """The data keys of a database of the previous layout (None when it has no such table)."""
    async with db.reader.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (LEGACY_TABLE,)
    ) as cur:
        if await cur.fetchone() is None:
            return None
    async with db.reader.execute(
        f"SELECT user_id, key_id, kek_id, wrapped_key, create_us, wrap_us FROM {LEGACY_TABLE}"
        " ORDER BY user_id"
    ) as cur:
        rows = await cur.fetchall()
    return [
        VaultKey(int(u), str(k), WrappedKey(str(kek), bytes(b)), int(c), int(w))
        for u, k, kek, b, c, w in rows
    ]


async def open_vault(config: ServerConfig, db: Database, now_us: int) -> KeyVault:
    """The vault holding this database's data keys (see the module docstring)."""
    if config.vault_database is not None:
        raise KeyVaultError(
            f"the key vault {config.vault_database.redacted()} is a PostgreSQL database, but "
            f"the database {config.database} is a SQLite file: its key vault is a SQLite file "
            "too (--key-vault FILE, or PULSESYNC_KEY_VAULT)"
        )
    path = config.vault_file
    async with db.transaction() as tx:
        await tx.execute(_BINDING_DDL)
    async with db.reader.execute("SELECT vault_id FROM profile_vault") as cur:
        row = await cur.fetchone()
    bound = str(row[0]) if row else None
    async with db.reader.execute(
        "SELECT COUNT(*), COUNT(DISTINCT user_id) FROM profile_versions"
    ) as cur:
        row = await cur.fetchone()
    versions, people = (int(row[0]), int(row[1])) if row else (0, 0)
    legacy = await legacy_keys(db)
    held = (
        f"the database {config.database} holds {versions} encrypted profile version(s) of "
        f"{people} person(s)"
    )

    if path.exists() and path.stat().st_size == 0:
        path.unlink()  # a creation interrupted before SQLite wrote anything: nothing to lose
    if path.exists():
        vault = await KeyVault.load(path)
        if vault.vault_id != bound:
            if bound is not None and versions and not legacy:
                raise KeyVaultError(
                    f"{held}, whose data keys are in the key vault {bound}, but {path} is "
                    f"another vault ({vault.vault_id}): it does not belong to this database. "
                    + _WHAT_TO_DO
                )
            stored = len(await vault.user_ids())
            if stored:
                raise KeyVaultError(
                    f"the key vault {path} holds {stored} data key(s) of another database "
                    f"(vault {vault.vault_id}; this database {config.database} is bound to "
                    f"{bound or 'no vault yet'}). Point --key-vault (or PULSESYNC_KEY_VAULT) "
                    "at the key vault this database was used with, or at a new path."
                )
            await _bind(db, vault, now_us)
    else:
        if versions and not legacy:
            raise KeyVaultError(
                f"{held}, but the key vault {path} that holds their data keys does not "
                "exist. " + _WHAT_TO_DO
            )
        vault = await KeyVault.create(path)
        log.info("created the profile key vault", extra={"path": str(path)})
        await _bind(db, vault, now_us)

    if legacy is not None:
        await _move_legacy_keys(config, db, vault, legacy)
    return vault


async def _bind(db: Database, vault: KeyVault, now_us: int) -> None:
    async with db.transaction() as tx:
        await tx.execute(
            "INSERT INTO profile_vault (singleton, vault_id, bind_us) VALUES (1, ?, ?)"
            " ON CONFLICT (singleton) DO UPDATE SET vault_id = excluded.vault_id,"
            " bind_us = excluded.bind_us",
            (vault.vault_id, now_us),
        )


async def _move_legacy_keys(
    config: ServerConfig, db: Database, vault: KeyVault, legacy: list[VaultKey]
) -> None:
    """Copy the old table's keys into the vault, check them there, then destroy the table."""
    if legacy:
        await vault.add_many(legacy)
        stored = {k.user_id: k for k in await vault.all()}
        for key in legacy:
            there = stored.get(key.user_id)
            if there is None or there.key_id != key.key_id:
                raise KeyVaultError(
                    f"moving profile data keys from {config.database} to the key vault "
                    f"{vault.path}: the vault holds another key for user {key.user_id} "
                    f"({there.key_id if there else 'none'}, the database has {key.key_id}). "
                    "The vault belongs to another database; point --key-vault (or "
                    "PULSESYNC_KEY_VAULT) at a new path and start again."
                )
    async with secure_delete(db), db.transaction() as tx:
        await tx.execute(f"DELETE FROM {LEGACY_TABLE}")
        await tx.execute(f"DROP TABLE {LEGACY_TABLE}")
    if legacy and str(db.path) != ":memory:":
        busy = await asyncio.to_thread(compact_database, db.path)
        if busy:
            log.warning("the database log stayed busy while compacting after the key move")
    log.info(
        "moved profile data keys from the database to the key vault",
        extra={"keys": len(legacy), "vault": str(vault.path), "database": str(config.database)},
    )

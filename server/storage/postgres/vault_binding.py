"""Binding a PostgreSQL database to the key vault file that holds its profiles' data keys.

The same rules as on SQLite (server/storage/sqlite/profile_vault.py), without the upgrade from
the old layout (a PostgreSQL database never had it): the database records the vault's id in
`profile_vault`; a missing vault is created only while the database holds no profile
ciphertext, and a vault that is another database's is refused while there is ciphertext, or
while it holds anyone's keys.
"""

from __future__ import annotations

from pulsesync.server.config import ServerConfig
from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.server.storage.sqlite.keys import KeyVault, KeyVaultError

_WHAT_TO_DO = (
    "Restore the key vault from its backup and point --key-vault (or PULSESYNC_KEY_VAULT) at "
    "it; without it the stored profiles cannot be decrypted."
)


async def open_vault(config: ServerConfig, pool: PostgresPool, now_us: int) -> KeyVault:
    """The vault file holding this database's data keys, created or checked and bound."""
    path = config.vault_file
    bound = await pool.fetchval("SELECT vault_id FROM profile_vault")
    row = (await pool.fetch("SELECT count(*), count(DISTINCT user_id) FROM profile_versions"))[0]
    versions, people = int(row[0]), int(row[1])
    held = f"the database holds {versions} encrypted profile version(s) of {people} person(s)"
    if path.exists() and path.stat().st_size == 0:
        path.unlink()  # a creation interrupted before SQLite wrote anything: nothing to lose
    if path.exists():
        vault = await KeyVault.load(path)
        if vault.vault_id == bound:
            return vault
        if bound is not None and versions:
            raise KeyVaultError(
                f"{held}, whose data keys are in the key vault {bound}, but {path} is another "
                f"vault ({vault.vault_id}): it does not belong to this database. " + _WHAT_TO_DO
            )
        stored = len(await vault.user_ids())
        if stored:
            raise KeyVaultError(
                f"the key vault {path} holds {stored} data key(s) of another database (vault "
                f"{vault.vault_id}; this database is bound to {bound or 'no vault yet'}). Point "
                "--key-vault (or PULSESYNC_KEY_VAULT) at the key vault this database was used "
                "with, or at a new path."
            )
    else:
        if versions:
            raise KeyVaultError(
                f"{held}, but the key vault {path} that holds their data keys does not exist. "
                + _WHAT_TO_DO
            )
        vault = await KeyVault.create(path)
    await pool.execute(
        "INSERT INTO profile_vault (singleton, vault_id, bind_us) VALUES (1, $1, $2)"
        " ON CONFLICT (singleton) DO UPDATE SET vault_id = excluded.vault_id,"
        " bind_us = excluded.bind_us",
        vault.vault_id,
        now_us,
    )
    return vault

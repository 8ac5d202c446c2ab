"""The key vault on PostgreSQL: each person's wrapped data key, in a database of its own.

    main database (--database postgresql://...)    profile ciphertexts; which vault holds
                                                   their keys (profile_vault)
    key vault (--key-vault postgresql://...)       per-person data keys, wrapped by the KEK
    key-encryption key (--key-file / PULSESYNC_KEK) never in either database

The vault is a separate database so that it can keep a much shorter backup and WAL-archive
retention than the main one: erasure destroys the person's row here, and once the vault's
backups older than that have aged out, every copy of their profile in every backup of the main
database is unreadable. Put it on another PostgreSQL cluster when the main one's WAL is
archived for long: WAL is per cluster, not per database (docs/scaling.md, "The key vault").

Deleting a row leaves its bytes in the table's pages until they are reused; `shred` therefore
rewrites the small table (VACUUM FULL: new files holding only the live rows, the old ones
unlinked) so no page of the vault keeps the wrapped key. Writes commit with synchronous_commit
on, whatever the cluster's default: a data key must be durable before anything is sealed
under it. Every replica opens the same vault (`open_postgres_vault`).
"""

from __future__ import annotations

import logging
from typing import Final

import asyncpg

from pulsesync.server.storage.database_url import DatabaseUrl
from pulsesync.server.storage.errors import DatabaseUnavailable
from pulsesync.server.storage.keys import ShredReport, VaultKey, WrappedKey
from pulsesync.server.storage.postgres.migrate import migrate
from pulsesync.server.storage.postgres.pool import Connection, PostgresPool
from pulsesync.server.storage.postgres.profiles import affected
from pulsesync.server.storage.sqlite.keys import VAULT_FORMAT, KeyVaultError

log = logging.getLogger(__name__)

MIGRATIONS: Final = "pulsesync.server.storage.postgres.migrations_vault"
# The vault's migration runner lock ("psvault!" in ASCII), apart from the main database's.
VAULT_MIGRATION_LOCK: Final = 0x70737661756C7421
# Operations are rare (a read per person per replica, an insert per new person, a delete per
# erasure): two connections per replica are plenty and keep N replicas cheap for the server.
POOL_SIZE: Final = 2
_COLUMNS: Final = "user_id, key_id, kek_id, wrapped_key, create_us, wrap_us"
_WHAT_TO_DO: Final = (
    "Restore the key vault from its backup and point --key-vault (or PULSESYNC_KEY_VAULT) at "
    "it; without it the stored profiles cannot be decrypted."
)


def _row(r: asyncpg.Record) -> VaultKey:
    user_id, key_id, kek_id, blob, create_us, wrap_us = r
    return VaultKey(
        int(user_id), str(key_id), WrappedKey(str(kek_id), bytes(blob)), int(create_us),
        int(wrap_us),
    )  # fmt: skip


async def _where(conn: Connection) -> tuple[object, ...]:
    """Which database and schema a connection is on, to tell two DSNs for one place apart."""
    row = await conn.fetchrow(
        "SELECT inet_server_addr()::text, inet_server_port(), current_database(), current_schema()"
    )
    return tuple(row) if row else ()


class PostgresKeyVault:
    """Wrapped data keys in their own PostgreSQL database (see the module docstring)."""

    def __init__(self, pool: PostgresPool, vault_id: str, location: str) -> None:
        self._pool = pool
        self.vault_id = vault_id
        self._location = location

    @property
    def path(self) -> str:
        """Where the vault lives, for operators' messages (the URL without its password)."""
        return self._location

    @classmethod
    async def open(cls, url: DatabaseUrl) -> PostgresKeyVault:
        """Connect, apply the vault's migrations (safe from several replicas at once) and
        read its identity. The caller closes it (`close`)."""
        if url.dsn is None:
            raise ValueError("a PostgreSQL key vault needs a postgresql:// URL")
        try:
            pool = await PostgresPool.open(url.dsn, min_size=1, max_size=POOL_SIZE)
        except DatabaseUnavailable as e:
            raise KeyVaultError(f"the key vault: {e}") from None
        try:
            await migrate(pool, package=MIGRATIONS, lock=VAULT_MIGRATION_LOCK)
            meta = {
                str(k): str(v) for k, v in await pool.fetch("SELECT name, value FROM vault_meta")
            }
        except BaseException:
            await pool.close()
            raise
        if meta.get("format") != VAULT_FORMAT or not meta.get("vault_id"):
            await pool.close()
            raise KeyVaultError(
                f"the database {url.redacted()} is not a PulseSync key vault (format "
                f"{meta.get('format')!r}); point --key-vault / PULSESYNC_KEY_VAULT at the vault"
            )
        return cls(pool, meta["vault_id"], url.redacted())

    async def close(self) -> None:
        await self._pool.close()

    async def __aenter__(self) -> PostgresKeyVault:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- reading -------------------------------------------------------------------------------
    async def get(self, user_id: int) -> VaultKey | None:
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM data_keys WHERE user_id = $1", user_id
        )
        return _row(rows[0]) if rows else None

    async def all(self) -> list[VaultKey]:
        return [
            _row(r)
            for r in await self._pool.fetch(f"SELECT {_COLUMNS} FROM data_keys ORDER BY user_id")
        ]

    async def kek_counts(self) -> dict[str, int]:
        rows = await self._pool.fetch("SELECT kek_id, COUNT(*) FROM data_keys GROUP BY kek_id")
        return {str(k): int(n) for k, n in rows}

    async def user_ids(self) -> set[int]:
        return {int(r[0]) for r in await self._pool.fetch("SELECT user_id FROM data_keys")}

    # -- writing -------------------------------------------------------------------------------
    async def add(self, key: VaultKey) -> bool:
        async with self._pool.transaction() as tx:
            await tx.execute("SET LOCAL synchronous_commit = on")
            status = await tx.execute(
                f"INSERT INTO data_keys ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
                " ON CONFLICT (user_id) DO NOTHING",
                key.user_id,
                key.key_id,
                key.wrapped.kek_id,
                key.wrapped.blob,
                key.create_us,
                key.wrap_us,
            )
        return affected(status) == 1

    async def replace_wrapped(self, updates: list[tuple[VaultKey, WrappedKey]], now_us: int) -> int:
        done = 0
        async with self._pool.transaction() as tx:
            await tx.execute("SET LOCAL synchronous_commit = on")
            for old, new in updates:
                status = await tx.execute(
                    "UPDATE data_keys SET kek_id = $1, wrapped_key = $2, wrap_us = $3"
                    " WHERE user_id = $4 AND key_id = $5 AND kek_id = $6 AND wrapped_key = $7",
                    new.kek_id,
                    new.blob,
                    now_us,
                    old.user_id,
                    old.key_id,
                    old.wrapped.kek_id,
                    old.wrapped.blob,
                )
                done += affected(status)
        return done

    async def shred(self, user_id: int) -> ShredReport:
        async with self._pool.transaction() as tx:
            await tx.execute("SET LOCAL synchronous_commit = on")
            status = await tx.execute("DELETE FROM data_keys WHERE user_id = $1", user_id)
        await self._rewrite()
        size = await self._pool.fetchval("SELECT pg_total_relation_size('data_keys')")
        return ShredReport(affected(status) > 0, False, int(size or 0))

    async def discard(self, user_id: int, key_id: str) -> bool:
        status = await self._pool.execute(
            "DELETE FROM data_keys WHERE user_id = $1 AND key_id = $2", user_id, key_id
        )
        return affected(status) > 0

    async def compact(self) -> bool:
        await self._rewrite()
        return False

    async def _rewrite(self) -> None:
        """VACUUM FULL: the table and its index rewritten to new files with only the live
        rows. It locks the table for the copy, milliseconds for one row per person; a read
        waiting meanwhile just waits."""
        await self._pool.execute("VACUUM FULL data_keys")


async def open_postgres_vault(
    url: DatabaseUrl, database: PostgresPool, database_label: str, now_us: int
) -> PostgresKeyVault:
    """The vault holding the main database's data keys, bound to it on first use.

    The main database records the vault's id (profile_vault). Refused, naming both: a vault
    that is the main database itself (its backups would hold the keys next to the ciphertext);
    another vault than the one the database's profiles were sealed under; a vault holding
    another database's keys. A database without profiles adopts an empty vault."""
    vault = await PostgresKeyVault.open(url)
    try:
        async with vault._pool.connection() as conn:
            vault_at = await _where(conn)
        async with database.connection() as conn:
            database_at = await _where(conn)
        if vault_at == database_at:
            raise KeyVaultError(
                f"the key vault {vault.path} is the main database {database_label}: give it a "
                "database of its own (with a short backup retention), so that a backup of the "
                "main database holds no key"
            )
        await _bind(vault, database, database_label, now_us)
    except BaseException:
        await vault.close()
        raise
    return vault


async def _bind(
    vault: PostgresKeyVault, database: PostgresPool, database_label: str, now_us: int
) -> None:
    async with database.transaction() as tx:
        # One replica binds at a time; the others then find the binding made.
        await tx.execute("LOCK TABLE profile_vault IN EXCLUSIVE MODE")
        bound = await tx.fetchval("SELECT vault_id FROM profile_vault")
        if bound == vault.vault_id:
            return
        versions, people = await tx.fetchrow(
            "SELECT COUNT(*), COUNT(DISTINCT user_id) FROM profile_versions"
        ) or (0, 0)
        if bound is not None and versions:
            raise KeyVaultError(
                f"the database {database_label} holds {versions} encrypted profile version(s) "
                f"of {people} person(s), whose data keys are in the key vault {bound}, but "
                f"{vault.path} is another vault ({vault.vault_id}). " + _WHAT_TO_DO
            )
        stored = len(await vault.user_ids())
        if stored:
            raise KeyVaultError(
                f"the key vault {vault.path} holds {stored} data key(s) of another database "
                f"(vault {vault.vault_id}; the database {database_label} is bound to "
                f"{bound or 'no vault yet'}). Point --key-vault (or PULSESYNC_KEY_VAULT) at "
                "the key vault this database was used with, or at a new database."
            )
        if versions:
            raise KeyVaultError(
                f"the database {database_label} holds {versions} encrypted profile version(s) "
                f"of {people} person(s) but is bound to no key vault, and {vault.path} is a new "
                "one. " + _WHAT_TO_DO
            )
        await tx.execute(
            "INSERT INTO profile_vault (singleton, vault_id, bind_us) VALUES (1, $1, $2)"
            " ON CONFLICT (singleton) DO UPDATE SET vault_id = excluded.vault_id,"
            " bind_us = excluded.bind_us",
            vault.vault_id,
            now_us,
        )
    log.info("bound the database to its key vault", extra={"vault": vault.path})

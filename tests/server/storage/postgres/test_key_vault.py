"""The profile key vault in a PostgreSQL database of its own: the same semantics as the SQLite
vault file, no page left holding a shredded key, binding to the main database, and the keys
shared by replicas (one vault, one key-encryption key from a file or the environment)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pulsesync.server.clock import FakeClock
from pulsesync.server.compose import open_profile_store
from pulsesync.server.config import ServerConfig, load_config
from pulsesync.server.profiles.crypto import (
    KEK_ENV,
    AesGcmSealer,
    FileKeyStore,
    KeyFileError,
)
from pulsesync.server.profiles.keys import DataKeys
from pulsesync.server.profiles.store import ProfileStore
from pulsesync.server.storage.database_url import DatabaseUrl, parse_database
from pulsesync.server.storage.db import Database
from pulsesync.server.storage.keys import VaultKey, WrappedKey
from pulsesync.server.storage.postgres.keys import PostgresKeyVault, open_postgres_vault
from pulsesync.server.storage.postgres.migrate import migrate
from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.server.storage.postgres.profiles import PostgresProfileStorage
from pulsesync.server.storage.sqlite.keys import KeyVaultError
from pulsesync.v1 import profiles_pb2
from tests.support.postgres import fresh_schema

SECRET = "zq-pg-vault-secret-91c2"


def key(user_id: int, blob: bytes, key_id: str = "dk_a", kek: str = "kek_1") -> VaultKey:
    return VaultKey(user_id, key_id, WrappedKey(kek, blob), 10, 10)


@pytest.fixture
async def vault_url(postgres_database: str) -> AsyncIterator[DatabaseUrl]:
    """The vault's own place (a schema of its own stands for a database of its own)."""
    async with fresh_schema(postgres_database) as dsn:
        yield parse_database(dsn)


@pytest.fixture
async def vault(vault_url: DatabaseUrl) -> AsyncIterator[PostgresKeyVault]:
    async with await PostgresKeyVault.open(vault_url) as v:
        yield v


async def raw_pages_hold(url: DatabaseUrl, needle: bytes) -> bool:
    """Whether any raw page of data_keys (live, dead or freed bytes alike) contains needle."""
    assert url.dsn is not None
    async with await PostgresPool.open(url.dsn, max_size=1) as pool:
        await pool.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
        found = await pool.fetchval(
            "SELECT bool_or(position($1::bytea IN get_raw_page('data_keys', blk::int)) > 0)"
            " FROM generate_series(0, pg_relation_size('data_keys')"
            " / current_setting('block_size')::int - 1) AS blk",
            needle,
        )
        return bool(found)


async def test_a_discarded_key_stays_in_the_page_until_the_vault_is_rewritten(
    vault: PostgresKeyVault, vault_url: DatabaseUrl
) -> None:
    """Why shred and compact rewrite the table: a plain DELETE leaves the bytes in the page
    (the both-backend shred test is in tests/server/storage/seams/)."""
    assert vault.path == vault_url.redacted()  # no password in messages
    blob = b"DISCARDED-KEY-0b9c" * 3
    assert await vault.add(key(5, blob))
    assert await vault.discard(5, "dk_a")
    assert await raw_pages_hold(vault_url, blob)
    assert not await vault.compact()
    assert not await raw_pages_hold(vault_url, blob)


async def test_replicas_opening_at_once_share_one_vault(vault_url: DatabaseUrl) -> None:
    vaults = await asyncio.gather(*(PostgresKeyVault.open(vault_url) for _ in range(3)))
    try:
        assert len({v.vault_id for v in vaults}) == 1
        assert await vaults[0].add(key(7, b"k7"))
        assert await vaults[2].get(7) == key(7, b"k7")
    finally:
        for v in vaults:
            await v.close()


async def test_binding_to_the_main_database_and_refusals(
    migrated_pool: PostgresPool, vault_url: DatabaseUrl, postgres_database: str
) -> None:
    main = migrated_pool
    bound = await open_postgres_vault(vault_url, main, "main", 1)
    await bound.close()
    assert await main.fetchval("SELECT vault_id FROM profile_vault") == bound.vault_id
    again = await open_postgres_vault(vault_url, main, "main", 2)  # every replica, every start
    assert again.vault_id == bound.vault_id
    await again.add(key(1, b"k1"))
    await again.close()
    await main.execute("INSERT INTO users (user_id, name, create_us) VALUES (1, 'ada', 1)")
    await main.execute(
        "INSERT INTO profile_versions VALUES (1, 1, 'dk_a', $1, $2, 'dev', 1)", b"n", b"c"
    )
    async with fresh_schema(postgres_database) as other_dsn:
        with pytest.raises(KeyVaultError) as err:
            await open_postgres_vault(parse_database(other_dsn), main, "main", 3)
        assert bound.vault_id in err.value.message
        assert "1 encrypted profile version(s)" in err.value.message
    # The vault of this database, with its keys, offered to another database: refused.
    async with (
        fresh_schema(postgres_database) as other_main_dsn,
        await PostgresPool.open(other_main_dsn, max_size=2) as other_main,
    ):
        await migrate(other_main)
        with pytest.raises(KeyVaultError) as err:
            await open_postgres_vault(vault_url, other_main, "other", 4)
        assert "1 data key(s) of another database" in err.value.message
    # The main database as its own vault: refused (its backups would hold the keys).
    assert vault_url.dsn is not None
    async with await PostgresPool.open(vault_url.dsn, max_size=1) as same_place:
        with pytest.raises(KeyVaultError) as err:
            await open_postgres_vault(vault_url, same_place, "itself", 5)
    assert "database of its own" in err.value.message


def test_key_vault_option_takes_a_file_or_a_postgresql_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PULSESYNC_KEY_VAULT", "postgresql://u:pw@db.internal:5432/vault")
    config = load_config()
    assert config.vault_database is not None
    assert config.vault_database.redacted() == "postgresql://u:***@db.internal:5432/vault"
    with pytest.raises(ValueError, match="PostgreSQL database"):
        _ = config.vault_file
    monkeypatch.setenv("PULSESYNC_KEY_VAULT", str(tmp_path / "v.db"))
    assert load_config().vault_file == tmp_path / "v.db"
    assert load_config().vault_database is None
    monkeypatch.setenv("PULSESYNC_KEY_VAULT", "mysql://x/y")
    with pytest.raises(ValueError, match="PULSESYNC_KEY_VAULT"):
        load_config()


async def test_replicas_share_keys_from_the_environment_over_the_postgresql_vault(
    migrated_pool: PostgresPool,
    vault_url: DatabaseUrl,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kek_file = tmp_path / "kek.key"
    FileKeyStore.create(kek_file)
    monkeypatch.setenv(KEK_ENV, kek_file.read_text())
    kek_file.unlink()  # nothing on disk: the keys come from the environment only
    await migrated_pool.execute("INSERT INTO users (user_id, name, create_us) VALUES (1, 'ada', 1)")
    profiles = PostgresProfileStorage(migrated_pool)
    clock = FakeClock()
    stores: list[ProfileStore] = []
    vaults: list[PostgresKeyVault] = []
    for _ in range(2):  # two replicas
        vault = await open_postgres_vault(vault_url, migrated_pool, "main", clock.now_us())
        vaults.append(vault)
        keys = await DataKeys.open(tmp_path / "absent.key", vault, profiles, must_exist=True)
        stores.append(ProfileStore(profiles, clock, keys, AesGcmSealer()))
    try:

        def mutate(p: profiles_pb2.Profile) -> None:
            p.preferences.app_settings["note"] = SECRET

        await stores[0].edit(1, mutate)
        assert (await stores[1].get(1)).preferences.app_settings["note"] == SECRET
        stored = await profiles.latest(1)
        assert stored is not None
        assert SECRET.encode() not in stored.ciphertext
        assert not kek_file.exists()
        assert isinstance(stores[0].keys.keystore, FileKeyStore)
        with pytest.raises(KeyFileError, match=KEK_ENV):
            stores[0].keys.keystore.add_primary()
        monkeypatch.delenv(KEK_ENV)
        # Without the variable and without a file, a replica refuses rather than making keys.
        with pytest.raises(KeyFileError, match="does not exist"):
            await DataKeys.open(tmp_path / "absent.key", vaults[0], profiles, must_exist=True)
        assert not (tmp_path / "absent.key").exists()
        monkeypatch.setenv(KEK_ENV, json.dumps({"format": "nope"}))
        with pytest.raises(KeyFileError, match=KEK_ENV):
            FileKeyStore.from_env()
    finally:
        for v in vaults:
            await v.close()


async def test_a_sqlite_database_refuses_a_postgresql_vault(tmp_path: Path) -> None:
    config = ServerConfig(
        data_dir=tmp_path, key_vault=parse_database("postgresql://u:pw@vault.internal/v")
    )
    async with await Database.open(config.database) as db:
        with pytest.raises(KeyVaultError) as err:
            await open_profile_store(config, db, FakeClock())
    assert "postgresql://u:***@vault.internal/v" in err.value.message
    assert "pw" not in err.value.message
    assert not config.kek_file.exists()

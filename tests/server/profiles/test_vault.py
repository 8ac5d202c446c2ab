"""The key vault: backups of the database hold no key, erasure reaches them, upgrades, refusals."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from pulsesync.server.clock import FakeClock
from pulsesync.server.compose import open_profile_store
from pulsesync.server.config import ServerConfig
from pulsesync.server.profiles.cli import rotate
from pulsesync.server.profiles.crypto import FileKeyStore, KeyFileError, ProfileIntegrityError
from pulsesync.server.profiles.store import ProfileStore
from pulsesync.server.storage.db import Database
from pulsesync.server.storage.keys import VaultKey
from pulsesync.server.storage.sqlite.keys import KeyVault, KeyVaultError, vault_bytes
from pulsesync.v1 import profiles_pb2

SECRET = "zq-vault-secret-3e1f"


@dataclass
class Env:
    config: ServerConfig
    db: Database
    store: ProfileStore
    clock: FakeClock

    @property
    def vault(self) -> KeyVault:
        # The server's vault is the SQLite key vault (checked, so its file can be inspected).
        vault = self.store.keys.vault
        assert isinstance(vault, KeyVault)
        return vault

    async def reopen(self, config: ServerConfig | None = None) -> ProfileStore:
        self.store = await open_profile_store(config or self.config, self.db, self.clock)
        return self.store


async def add_users(db: Database, *names: str) -> None:
    async with db.transaction() as tx:
        for uid, name in enumerate(names, start=1):
            await tx.execute("INSERT INTO users VALUES (?, ?, 0)", (uid, name))


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    config = ServerConfig(data_dir=tmp_path / "data")
    clock = FakeClock()
    async with await Database.open(config.database) as db:
        await add_users(db, "ada", "bo")
        store = await open_profile_store(config, db, clock)
        yield Env(config, db, store, clock)


async def set_note(store: ProfileStore, user_id: int, note: str) -> None:
    def mutate(p: profiles_pb2.Profile) -> None:
        p.preferences.app_settings["note"] = note

    await store.edit(user_id, mutate)


async def note_of(store: ProfileStore, user_id: int) -> str:
    return (await store.get(user_id)).preferences.app_settings["note"]


def on_disk(db_path: Path) -> bytes:
    """The database file and every side file SQLite keeps next to it."""
    return b"".join(
        p.read_bytes()
        for p in (db_path, *(db_path.with_name(db_path.name + s) for s in ("-wal", "-shm")))
        if p.exists()
    )


def backup_of(db_path: Path, to: Path) -> Path:
    """An online backup, as `sqlite3 .backup` or a backup tool would take it."""
    to.parent.mkdir(parents=True, exist_ok=True)
    live, copy = sqlite3.connect(db_path), sqlite3.connect(to)
    try:
        live.backup(copy)
    finally:
        live.close()
        copy.close()
    return to


async def erase(env: Env, user_id: int) -> None:
    """What the privacy erasure does for profiles: the rows, then the profiles hook."""
    async with env.db.transaction() as tx:
        await tx.execute("DELETE FROM profile_versions WHERE user_id = ?", (user_id,))
        await tx.execute("DELETE FROM profile_feature_usage WHERE user_id = ?", (user_id,))
        await tx.execute("DELETE FROM users WHERE user_id = ?", (user_id,))
    await env.store.erase_user(user_id)


async def test_the_vault_is_private_and_the_database_holds_no_key(env: Env) -> None:
    await set_note(env.store, 1, SECRET)
    path = env.config.vault_file
    assert path == env.config.data_dir / "keyvault.db"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    stored = await env.vault.get(1)
    assert stored is not None
    data_key = env.store.keys.cache[1].key
    blob = on_disk(env.config.database)
    assert stored.wrapped.blob not in blob
    assert data_key not in blob
    assert stored.wrapped.blob in vault_bytes(path)  # the scan does see a key where it is
    assert data_key not in vault_bytes(path)  # and the vault holds it wrapped only


async def test_a_backup_taken_before_erasure_cannot_decrypt_the_erased_person(
    env: Env, tmp_path: Path
) -> None:
    # Another process (e.g. `pulsesync keys rotate`) has the vault open throughout, so its
    # log is not removed on close and old frames would survive if erasure left them there.
    other = sqlite3.connect(env.config.vault_file)
    assert other.execute("SELECT value FROM vault_meta WHERE name = 'format'").fetchone()
    await set_note(env.store, 1, "ada-" + SECRET)
    await set_note(env.store, 2, "bo-note")
    wal = env.config.vault_file.with_name("keyvault.db-wal")
    ada_key = await env.vault.get(1)
    assert ada_key is not None
    backup = backup_of(env.config.database, tmp_path / "backups" / "monday.db")
    assert ada_key.wrapped.blob not in on_disk(backup)
    assert env.store.keys.cache[1].key not in on_disk(backup)

    assert ada_key.wrapped.blob in wal.read_bytes()  # before: in the log
    await erase(env, 1)
    # No byte of the wrapped key is left in the vault, its log included.
    assert wal.exists()
    assert await env.vault.get(1) is None
    assert ada_key.wrapped.blob not in vault_bytes(env.config.vault_file)
    # A window of it neither (a partial page could survive a careless compaction).
    left = vault_bytes(env.config.vault_file)
    blob = ada_key.wrapped.blob
    assert not any(blob[i : i + 16] in left for i in range(0, len(blob) - 16, 4))
    other.close()

    # Restore the backup beside the live key file and vault: it starts (the vault is the one
    # it belongs to), everyone else reads as before, the erased person cannot be decrypted.
    restored = replace(env.config, db_path=backup)
    async with await Database.open(backup) as db:
        store = await open_profile_store(restored, db, env.clock)
        assert await note_of(store, 2) == "bo-note"
        with pytest.raises(ProfileIntegrityError) as err:
            await store.get(1)
        assert err.value.reason == "PROFILE_KEY_MISSING"
        with pytest.raises(ProfileIntegrityError):
            await store.get_version(1, 1)
        # The ciphertext is still in the backup; only the key is gone.
        async with db.reader.execute(
            "SELECT COUNT(*) FROM profile_versions WHERE user_id = 1"
        ) as cur:
            assert (await cur.fetchone()) == (1,)

    # The erased id is reused by a new person, who gets a new key: the backup's old
    # ciphertext under that id still does not open (key ids differ, and are in the AAD).
    await add_users(env.db, "cy")
    async with env.db.reader.execute("SELECT user_id FROM users WHERE name = 'cy'") as cur:
        assert (await cur.fetchone()) == (1,)
    await set_note(env.store, 1, "cy-note")
    assert await note_of(env.store, 1) == "cy-note"
    async with await Database.open(backup) as db:
        store = await open_profile_store(restored, db, env.clock)
        with pytest.raises(ProfileIntegrityError, match="names data key"):
            await store.get(1)
        assert await note_of(store, 2) == "bo-note"

    # Rotating the key-encryption key does not retire the backup for anyone else.
    keystore = env.store.keys.keystore
    assert isinstance(keystore, FileKeyStore)
    await rotate(env.vault, keystore, env.clock.now_us())
    async with await Database.open(backup) as db:
        store = await open_profile_store(restored, db, env.clock)
        assert await note_of(store, 2) == "bo-note"
        with pytest.raises(ProfileIntegrityError):
            await store.get(1)


OLD_LAYOUT = """
CREATE TABLE profile_keys (
    user_id     INTEGER PRIMARY KEY REFERENCES users(user_id) ON DELETE CASCADE,
    key_id      TEXT NOT NULL,
    kek_id      TEXT NOT NULL,
    wrapped_key BLOB NOT NULL,
    create_us   INTEGER NOT NULL,
    wrap_us     INTEGER NOT NULL
)
"""


async def make_old_layout(env: Env) -> list[VaultKey]:
    """Turn env's files into what the previous layout left: keys in the database, no vault."""
    keys = await env.vault.all()
    async with env.db.transaction() as tx:
        await tx.execute(OLD_LAYOUT)
        await tx.executemany(
            "INSERT INTO profile_keys VALUES (?, ?, ?, ?, ?, ?)",
            [
                (k.user_id, k.key_id, k.wrapped.kek_id, k.wrapped.blob, k.create_us, k.wrap_us)
                for k in keys
            ],
        )
        await tx.execute("DROP TABLE profile_vault")  # the old schema did not have it
    for f in env.config.vault_file.parent.glob("keyvault.db*"):
        f.unlink()
    return keys


async def test_a_database_of_the_old_layout_is_upgraded_on_start(env: Env) -> None:
    await set_note(env.store, 1, "ada-note")
    await set_note(env.store, 2, "bo-note")
    keys = await make_old_layout(env)
    assert len(keys) == 2
    assert keys[0].wrapped.blob in on_disk(env.config.database)
    old_backup = backup_of(env.config.database, env.config.data_dir.parent / "old" / "p.db")

    store = await env.reopen()
    assert await note_of(store, 1) == "ada-note"
    assert await note_of(store, 2) == "bo-note"
    assert await env.vault.all() == keys  # moved as they were: still wrapped, same KEK
    async with env.db.reader.execute(
        "SELECT name FROM sqlite_master WHERE name IN ('profile_keys', 'profile_vault')"
    ) as cur:
        assert [r[0] for r in await cur.fetchall()] == ["profile_vault"]
    blob = on_disk(env.config.database)
    for key in keys:
        assert key.wrapped.blob not in blob  # not even in freed pages or the log
    assert stat.S_IMODE(env.config.vault_file.stat().st_mode) == 0o600
    # New people get keys in the vault; an erasure after the upgrade shreds there.
    await erase(env, 1)
    assert keys[0].wrapped.blob not in vault_bytes(env.config.vault_file)
    assert await note_of(await env.reopen(), 2) == "bo-note"
    # A backup from before the upgrade is never merged into the live vault (it would bring
    # back the erased person's key): it refuses to start beside it.
    async with await Database.open(old_backup) as db:
        with pytest.raises(KeyVaultError, match="another database"):
            await open_profile_store(replace(env.config, db_path=old_backup), db, env.clock)
    assert await env.vault.get(1) is None


async def test_an_upgrade_interrupted_after_the_copy_is_finished_on_the_next_start(
    env: Env,
) -> None:
    await set_note(env.store, 1, "ada-note")
    keys = await make_old_layout(env)
    # The previous start created and bound the vault and copied the keys, then stopped
    # before the old table was dropped.
    vault = await KeyVault.create(env.config.vault_file)
    async with env.db.transaction() as tx:
        await tx.execute(
            "CREATE TABLE profile_vault (singleton INTEGER PRIMARY KEY CHECK (singleton = 1),"
            " vault_id TEXT NOT NULL, bind_us INTEGER NOT NULL)"
        )
        await tx.execute("INSERT INTO profile_vault VALUES (1, ?, 0)", (vault.vault_id,))
    await vault.add_many(keys)
    store = await env.reopen()
    assert await note_of(store, 1) == "ada-note"
    assert await env.vault.all() == keys
    assert keys[0].wrapped.blob not in on_disk(env.config.database)


async def test_a_missing_vault_refuses_to_start_and_creates_nothing(env: Env) -> None:
    await set_note(env.store, 1, "ada-note")
    path = env.config.vault_file
    saved = path.rename(path.with_name("elsewhere.db"))
    with pytest.raises(KeyVaultError) as err:
        await env.reopen()
    msg = err.value.message
    assert str(path) in msg
    assert str(env.config.database) in msg
    assert "does not exist" in msg
    assert "--key-vault" in msg
    assert not path.exists()  # no fresh, empty vault left behind
    # Pointed at where it is (as --key-vault / PULSESYNC_KEY_VAULT would), it starts.
    store = await env.reopen(replace(env.config, key_vault=saved))
    assert await note_of(store, 1) == "ada-note"


async def test_another_databases_vault_refuses_to_start(env: Env, tmp_path: Path) -> None:
    await set_note(env.store, 1, "ada-note")
    # A second deployment with its own vault (same key file, so only the vault differs).
    other = replace(env.config, db_path=tmp_path / "other" / "pulsesync.db", key_vault=None)
    other = replace(other, data_dir=tmp_path / "other", key_file=env.config.kek_file)
    async with await Database.open(other.database) as db:
        await add_users(db, "zed")
        other_store = await open_profile_store(other, db, env.clock)
        await set_note(other_store, 1, "zed-note")
    with pytest.raises(KeyVaultError) as err:
        await env.reopen(replace(env.config, key_vault=other.vault_file))
    assert str(other.vault_file) in err.value.message
    assert "does not belong to this database" in err.value.message
    # And a fresh database never adopts a vault holding other people's keys.
    fresh = replace(other, db_path=tmp_path / "fresh" / "pulsesync.db")
    async with await Database.open(fresh.database) as db:
        with pytest.raises(KeyVaultError, match="another database"):
            await open_profile_store(fresh, db, env.clock)


async def test_a_vault_that_is_not_one_or_is_readable_by_others_refuses(env: Env) -> None:
    await set_note(env.store, 1, "ada-note")
    path = env.config.vault_file
    path.chmod(0o644)
    with pytest.raises(KeyVaultError, match="chmod 600"):
        await env.reopen()
    path.chmod(0o600)
    saved = path.read_bytes()
    path.write_bytes(b"not a database at all, just some bytes " * 200)
    with pytest.raises(KeyVaultError, match="not a PulseSync key vault") as err:
        await env.reopen()
    assert str(path) in err.value.message
    path.write_bytes(saved)
    assert await note_of(await env.reopen(), 1) == "ada-note"


async def test_an_altered_vault_row_refuses_to_start(env: Env) -> None:
    await set_note(env.store, 1, "ada-note")
    with sqlite3.connect(env.config.vault_file) as conn:
        (blob,) = conn.execute("SELECT wrapped_key FROM data_keys WHERE user_id = 1").fetchone()
        bad = bytes([blob[0]]) + bytes([blob[1] ^ 1]) + blob[2:]
        conn.execute("UPDATE data_keys SET wrapped_key = ? WHERE user_id = 1", (bad,))
    conn.close()
    with pytest.raises(KeyFileError, match="key vault was altered"):
        await env.reopen()


async def test_rotation_rewraps_the_vault_and_new_writes_use_the_new_kek(env: Env) -> None:
    await set_note(env.store, 1, "ada-note")
    await set_note(env.store, 2, "bo-note")
    keystore = env.store.keys.keystore
    assert isinstance(keystore, FileKeyStore)
    old = keystore.primary_id
    before = {k.user_id: k for k in await env.vault.all()}
    done = await rotate(env.vault, keystore, env.clock.now_us())
    assert (done.rewrapped, done.removed) == (2, (old,))
    after = {k.user_id: k for k in await env.vault.all()}
    for uid in (1, 2):
        assert after[uid].key_id == before[uid].key_id  # same data key, new wrap
        assert after[uid].wrapped.kek_id == done.new_kek_id
        assert before[uid].wrapped.blob not in vault_bytes(env.config.vault_file)
    env.store.forget_caches()
    assert await note_of(env.store, 1) == "ada-note"
    store = await env.reopen()
    assert await note_of(store, 2) == "bo-note"
    async with env.db.transaction() as tx:
        await tx.execute("INSERT INTO users VALUES (3, 'cy', 0)")
    await set_note(store, 3, "cy-note")
    cy = await env.vault.get(3)
    assert cy is not None
    assert cy.wrapped.kek_id == done.new_kek_id


async def test_a_write_that_fails_after_its_key_was_made_leaves_no_key_behind(env: Env) -> None:
    # A write racing an erasure: the person's row is gone, so the version cannot commit.
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        await set_note(env.store, 9, "late write")
    assert await env.vault.get(9) is None
    assert await env.vault.user_ids() == set()
    await set_note(env.store, 1, "ada-note")  # and the store keeps working
    assert await env.vault.user_ids() == {1}

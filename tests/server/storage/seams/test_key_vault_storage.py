"""The key vault seam behaves the same as a SQLite file and as a PostgreSQL database, and a
shredded key leaves no byte in either (the file and its log; the table's raw pages)."""

from __future__ import annotations

from pathlib import Path

from pulsesync.server.storage.keys import KeyVaultStorage, VaultKey, WrappedKey
from pulsesync.server.storage.postgres.keys import PostgresKeyVault
from pulsesync.server.storage.sqlite.keys import KeyVault, vault_bytes


def key(user_id: int, blob: bytes, key_id: str = "dk_a", kek: str = "kek_1") -> VaultKey:
    return VaultKey(user_id, key_id, WrappedKey(kek, blob), 10, 10)


async def holds(vault: KeyVaultStorage, needle: bytes) -> bool:
    """Whether any stored byte of the vault, freed space included, contains needle."""
    if isinstance(vault, KeyVault):
        return needle in vault_bytes(vault.path)
    assert isinstance(vault, PostgresKeyVault)
    async with vault._pool.connection() as conn:  # the vault's own database
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
        found = await conn.fetchval(
            "SELECT bool_or(position($1::bytea IN get_raw_page('data_keys', blk::int)) > 0)"
            " FROM generate_series(0, pg_relation_size('data_keys')"
            " / current_setting('block_size')::int - 1) AS blk",
            needle,
        )
    return bool(found)


async def test_keys_are_added_once_rewrapped_and_discarded(key_vault: KeyVaultStorage) -> None:
    vault = key_vault
    assert isinstance(vault.path, Path | str)
    assert await vault.add(key(2, b"w2"))
    assert await vault.add(key(1, b"w1"))
    assert not await vault.add(key(1, b"other"))  # the person has one already
    assert await vault.get(1) == key(1, b"w1")
    assert await vault.get(3) is None
    assert [k.user_id for k in await vault.all()] == [1, 2]
    assert await vault.user_ids() == {1, 2}
    assert await vault.kek_counts() == {"kek_1": 2}
    stale = key(2, b"not-what-is-stored")
    done = await vault.replace_wrapped(
        [(key(1, b"w1"), WrappedKey("kek_2", b"n1")), (stale, WrappedKey("kek_2", b"n2"))], 99
    )
    assert done == 1  # the row that changed meanwhile is left alone
    assert await vault.get(1) == VaultKey(1, "dk_a", WrappedKey("kek_2", b"n1"), 10, 99)
    assert await vault.kek_counts() == {"kek_1": 1, "kek_2": 1}
    assert not await vault.discard(2, "dk_other")
    assert await vault.discard(2, "dk_a")
    assert await vault.user_ids() == {1}
    assert not await vault.compact()


async def test_shred_leaves_no_byte_of_the_key(key_vault: KeyVaultStorage) -> None:
    vault = key_vault
    ada_blob, bo_blob = b"ADA-WRAPPED-KEY-5d1e" * 3, b"BO-WRAPPED-KEY-77aa" * 3
    assert await vault.add(key(1, ada_blob))
    assert await vault.add(key(2, bo_blob))
    assert await holds(vault, ada_blob)
    report = await vault.shred(1)
    assert report.deleted
    assert not report.checkpoint_busy
    assert report.vault_bytes_after > 0
    assert not await holds(vault, ada_blob)
    assert await vault.get(2) == key(2, bo_blob)  # everyone else's key is intact
    assert await vault.get(1) is None
    assert not (await vault.shred(1)).deleted

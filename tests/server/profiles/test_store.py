"""Encryption at rest, integrity, key files, rotation, erasure and export of profiles."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pulsesync.hlc import Stamp
from pulsesync.server.clock import FakeClock
from pulsesync.server.compose import open_profile_store
from pulsesync.server.config import ServerConfig
from pulsesync.server.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from pulsesync.server.profiles.cli import rotate
from pulsesync.server.profiles.crypto import (
    NONCE_BYTES,
    AesGcmSealer,
    FileKeyStore,
    KeyFileError,
    ProfileIntegrityError,
    profile_aad,
)
from pulsesync.server.profiles.store import ProfileStore
from pulsesync.server.storage.db import Database
from pulsesync.v1 import profiles_pb2

MARKERS = {
    "theme": "zq-marker-theme-7f3a",
    "setting": "zq-marker-setting-91c2",
    "title": "zq-marker-title-55d0",
    "muted": "zq-marker-muted-0b8e",
    "pinned": "zq-marker-pinned-c4d1",
}


def one(row: Any) -> Any:
    """A row that must exist."""
    assert row is not None
    return row


@dataclass
class Env:
    config: ServerConfig
    db: Database
    store: ProfileStore
    clock: FakeClock

    async def reopen(self) -> ProfileStore:
        self.store = await open_profile_store(self.config, self.db, self.clock)
        return self.store


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    config = ServerConfig(data_dir=tmp_path)
    clock = FakeClock()
    async with await Database.open(config.database) as db:
        for uid, name in ((1, "ada"), (2, "bo")):
            await db.writer.execute("INSERT INTO users VALUES (?, ?, 0)", (uid, name))
        store = await open_profile_store(config, db, clock)
        yield Env(config, db, store, clock)


def marked(n: int = 0) -> profiles_pb2.Profile:
    p = profiles_pb2.Profile(time_zone="Europe/Paris")
    p.preferences.theme = f"{MARKERS['theme']}-{n}"
    p.preferences.app_settings["editor"] = MARKERS["setting"]
    p.continuity_items.add(app="reader", item_id="b1", title=MARKERS["title"], progress=0.5)
    p.muted_nudge_types.append(MARKERS["muted"])
    p.layout.pinned_order.append(MARKERS["pinned"])
    return p


PATHS = [
    "time_zone",
    "preferences.theme",
    "preferences.app_settings/editor",
    "continuity_items/reader/b1",
    f"muted_nudge_types/{MARKERS['muted']}",
    "layout.pinned_order",
]


async def write(
    store: ProfileStore,
    user: int,
    profile: profiles_pb2.Profile,
    wall: int,
    node: str = "dev_a",
    base: int = 0,
) -> profiles_pb2.Profile:
    edits = [
        profiles_pb2.ProfileEdit(field_path=p, stamp=Stamp(wall, 0, node).to_proto()) for p in PATHS
    ]
    return (await store.update(user, profile, edits, base_version=base, device_id=node)).profile


async def test_no_plaintext_reaches_the_database_file(env: Env) -> None:
    for n in range(3):
        await write(env.store, 1, marked(n), 1000 + n)
    got = await env.store.get(1)
    assert got.preferences.theme == f"{MARKERS['theme']}-2"
    files = [env.config.database, *env.config.database.parent.glob("pulsesync.db-*")]
    assert any(f.name.endswith("-wal") for f in files)
    blob = b"".join(f.read_bytes() for f in files)
    assert len(blob) > 0
    for marker in MARKERS.values():
        assert marker.encode() not in blob, marker
    # The same scan does find plaintext a table stores unencrypted (the scan works).
    await env.db.writer.execute("INSERT INTO users VALUES (3, ?, 0)", (MARKERS["theme"] + "-u",))
    blob = b"".join(f.read_bytes() for f in files)
    assert (MARKERS["theme"] + "-u").encode() in blob


async def test_every_flipped_byte_fails_with_an_integrity_error(env: Env) -> None:
    await write(env.store, 1, marked(), 1000)
    async with env.db.reader.execute(
        "SELECT key_id, nonce, ciphertext FROM profile_versions WHERE user_id = 1"
    ) as cur:
        key_id, nonce, ciphertext = one(await cur.fetchone())
    sealed = bytes(nonce) + bytes(ciphertext)
    # Every byte of the sealed form, against the real cipher and associated data.
    dk = env.store.keys.cache[1]
    sealer = AesGcmSealer()
    aad = profile_aad(1, 1, key_id)
    assert sealer.open(dk.key, sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    from cryptography.exceptions import InvalidTag

    for i in range(len(sealed)):
        bad = bytearray(sealed)
        bad[i] ^= 0x01
        with pytest.raises(InvalidTag):
            sealer.open(dk.key, bytes(bad[:NONCE_BYTES]), bytes(bad[NONCE_BYTES:]), aad)
    # And through the store, from the database, at a few positions (nonce, body, tag).
    for column, pos in (
        ("nonce", 0),
        ("ciphertext", 0),
        ("ciphertext", len(ciphertext) // 2),
        ("ciphertext", len(ciphertext) - 1),
    ):
        original = bytes(nonce if column == "nonce" else ciphertext)
        bad = bytearray(original)
        bad[pos] ^= 0x80
        async with env.db.transaction() as tx:
            await tx.execute(
                f"UPDATE profile_versions SET {column} = ? WHERE user_id = 1", (bytes(bad),)
            )
        env.store.forget_caches()
        with pytest.raises(ProfileIntegrityError, match="failed authentication") as err:
            await env.store.get(1)
        assert err.value.reason == "PROFILE_INTEGRITY"
        async with env.db.transaction() as tx:
            await tx.execute(
                f"UPDATE profile_versions SET {column} = ? WHERE user_id = 1", (original,)
            )
    env.store.forget_caches()
    assert (await env.store.get(1)).version == 1


async def test_swapped_users_ciphertexts_fail(env: Env) -> None:
    await write(env.store, 1, marked(1), 1000)
    await write(env.store, 2, marked(2), 1000, node="dev_b")
    async with env.db.transaction() as tx:
        rows = {}
        for uid in (1, 2):
            async with tx.execute(
                "SELECT key_id, nonce, ciphertext FROM profile_versions WHERE user_id = ?", (uid,)
            ) as cur:
                rows[uid] = one(await cur.fetchone())
        for uid, other in ((1, 2), (2, 1)):
            await tx.execute(
                "UPDATE profile_versions SET nonce = ?, ciphertext = ? WHERE user_id = ?",
                (rows[other][1], rows[other][2], uid),
            )
    env.store.forget_caches()
    for uid in (1, 2):
        with pytest.raises(ProfileIntegrityError, match="failed authentication"):
            await env.store.get(uid)
    # Moving the key id along too is caught before decrypting.
    async with env.db.transaction() as tx:
        await tx.execute("UPDATE profile_versions SET key_id = ? WHERE user_id = 1", (rows[2][0],))
    env.store.forget_caches()
    with pytest.raises(ProfileIntegrityError, match="names data key"):
        await env.store.get(1)
    # Swapping the wrapped data keys in the vault fails too (they are bound to their user).
    vault = env.config.vault_file
    with sqlite3.connect(vault) as conn:
        k1, k2 = conn.execute(
            "SELECT user_id, key_id, wrapped_key FROM data_keys ORDER BY user_id"
        ).fetchall()
        for (uid, _, _), (_, key_id, wrapped) in ((k1, k2), (k2, k1)):
            conn.execute(
                "UPDATE data_keys SET key_id = ?, wrapped_key = ? WHERE user_id = ?",
                (key_id, wrapped, uid),
            )
    conn.close()
    env.store.forget_caches()
    with pytest.raises(ProfileIntegrityError, match="wrapped data key"):
        await env.store.get(1)


async def test_replayed_old_version_fails(env: Env) -> None:
    await write(env.store, 1, marked(1), 1000)
    await write(env.store, 1, marked(2), 2000, base=1)
    async with env.db.transaction() as tx:
        async with tx.execute(
            "SELECT nonce, ciphertext FROM profile_versions WHERE user_id = 1 AND version = 1"
        ) as cur:
            old = one(await cur.fetchone())
        await tx.execute(
            "UPDATE profile_versions SET nonce = ?, ciphertext = ? WHERE user_id = 1 AND version = 2",
            (old[0], old[1]),
        )
    env.store.forget_caches()
    with pytest.raises(ProfileIntegrityError, match="replayed"):
        await env.store.get(1)
    assert (await env.store.get_version(1, 1)).preferences.theme.endswith("-1")


async def test_nonce_is_fresh_per_write(env: Env) -> None:
    for n in range(5):
        await write(env.store, 1, marked(n), 1000 + n, base=n)
    async with env.db.reader.execute("SELECT nonce FROM profile_versions") as cur:
        nonces = [bytes(r[0]) for r in await cur.fetchall()]
    assert len(nonces) == 5
    assert len(set(nonces)) == 5
    assert all(len(n) == 12 for n in nonces)


async def test_key_file_is_private_and_wrong_or_missing_key_refuses(env: Env) -> None:
    path = env.config.kek_file
    assert os.stat(path).st_mode & 0o777 == 0o600
    await write(env.store, 1, marked(), 1000)
    # A different key file: refuses, naming the file and what to do.
    saved = path.read_bytes()
    path.unlink()
    FileKeyStore.create(path)
    with pytest.raises(KeyFileError, match="wrong key file") as err:
        await env.reopen()
    assert str(path) in err.value.message
    assert "--key-file" in err.value.message
    # Missing key file while the database holds wrapped keys: refuses.
    path.unlink()
    with pytest.raises(KeyFileError, match="does not exist"):
        await env.reopen()
    assert not path.exists()  # and it did not create a fresh one
    # Same id, different key material: rejected as not matching its id.
    path.write_bytes(saved.replace(saved[saved.index(b'"key": "') + 8 :][:4], b"AAAA"))
    path.chmod(0o600)
    with pytest.raises(KeyFileError):
        await env.reopen()
    # Readable by others: refused with the chmod to run.
    path.write_bytes(saved)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        await env.reopen()
    path.chmod(0o600)
    store = await env.reopen()
    assert (await store.get(1)).preferences.theme.startswith(MARKERS["theme"])


async def test_rotation_rewraps_keys_and_old_versions_stay_readable(env: Env) -> None:
    await write(env.store, 1, marked(1), 1000)
    await write(env.store, 1, marked(2), 2000, base=1)
    await write(env.store, 2, marked(3), 1000, node="dev_b")
    async with env.db.reader.execute("SELECT nonce, ciphertext FROM profile_versions") as cur:
        before = await cur.fetchall()
    keystore = env.store.keys.keystore
    assert isinstance(keystore, FileKeyStore)
    old_id = keystore.primary_id
    assert env.store.keys.vault is not None
    done = await rotate(env.store.keys.vault, keystore, env.clock.now_us())
    assert done.rewrapped == 2
    assert done.removed == (old_id,)
    assert done.new_kek_id != old_id
    async with env.db.reader.execute("SELECT nonce, ciphertext FROM profile_versions") as cur:
        assert await cur.fetchall() == before  # profiles were not re-encrypted
    assert await env.store.keys.vault.kek_counts() == {done.new_kek_id: 2}
    assert old_id not in env.config.kek_file.read_text()
    store = await env.reopen()  # a restart with the rotated key file
    assert (await store.get_version(1, 1)).preferences.theme.endswith("-1")
    assert (await store.get(1)).preferences.theme.endswith("-2")
    assert (await store.get(2)).preferences.theme.endswith("-3")


async def test_stale_base_is_merged_and_names_the_fields_another_device_won(env: Env) -> None:
    a = profiles_pb2.Profile(time_zone="Asia/Tokyo")
    a.goals.daily_steps = 8000
    await env.store.update(
        1,
        a,
        [
            profiles_pb2.ProfileEdit(
                field_path="time_zone", stamp=Stamp(2000, 0, "dev_a").to_proto()
            ),
            profiles_pb2.ProfileEdit(
                field_path="goals.daily_steps", stamp=Stamp(2000, 0, "dev_a").to_proto()
            ),
        ],
        base_version=0,
        device_id="dev_a",
    )
    # dev_b edited offline from version 0, earlier for time_zone, and another field.
    b = profiles_pb2.Profile(time_zone="UTC")
    b.goals.daily_study_minutes = 30
    result = await env.store.update(
        1,
        b,
        [
            profiles_pb2.ProfileEdit(
                field_path="time_zone", stamp=Stamp(1500, 0, "dev_b").to_proto()
            ),
            profiles_pb2.ProfileEdit(
                field_path="goals.daily_study_minutes", stamp=Stamp(1500, 0, "dev_b").to_proto()
            ),
        ],
        base_version=0,
        device_id="dev_b",
    )
    assert result.committed
    assert result.overridden_fields == ("time_zone",)
    p = result.profile
    assert (p.version, p.time_zone, p.goals.daily_steps, p.goals.daily_study_minutes) == (
        2,
        "Asia/Tokyo",
        8000,
        30,
    )
    # The same request again (a retry after a lost response) changes nothing.
    again = await env.store.update(
        1,
        b,
        [
            profiles_pb2.ProfileEdit(
                field_path="goals.daily_study_minutes", stamp=Stamp(1500, 0, "dev_b").to_proto()
            )
        ],
        base_version=1,
        device_id="dev_b",
    )
    assert not again.committed
    assert again.profile.version == 2
    # A delete is a tombstone that wins over an older value.
    gone = await env.store.update(
        1,
        profiles_pb2.Profile(),
        [
            profiles_pb2.ProfileEdit(
                field_path="goals.daily_steps",
                stamp=Stamp(3000, 0, "dev_b").to_proto(),
                delete=True,
            )
        ],
        base_version=2,
        device_id="dev_b",
    )
    assert gone.profile.goals.daily_steps == 0
    assert gone.profile.field_stamps["goals.daily_steps"].wall_time_ms == 3000


async def test_bad_edits_are_refused_clearly(env: Env) -> None:
    def edit(path: str, node: str = "dev_a", wall: int = 1000) -> list[profiles_pb2.ProfileEdit]:
        return [profiles_pb2.ProfileEdit(field_path=path, stamp=Stamp(wall, 0, node).to_proto())]

    cases = [
        (profiles_pb2.Profile(), edit("goals.nope"), "UNKNOWN_FIELD_PATH"),
        (profiles_pb2.Profile(time_zone="Mars/Base"), edit("time_zone"), "INVALID_TIME_ZONE"),
        (
            profiles_pb2.Profile(time_zone="UTC"),
            edit("time_zone", node="dev_x"),
            "STAMP_NODE_MISMATCH",
        ),
        (
            profiles_pb2.Profile(time_zone="UTC"),
            edit("time_zone", wall=env.clock.now_us() // 1000 + 3_600_000),
            "STAMP_IN_FUTURE",
        ),
        (
            profiles_pb2.Profile(quiet_hours=profiles_pb2.QuietHours(start_minute=1440)),
            edit("quiet_hours"),
            "INVALID_PROFILE_VALUE",
        ),
        (profiles_pb2.Profile(), edit("continuity_items/app/item"), "MISSING_VALUE"),
    ]
    for profile, edits, reason in cases:
        with pytest.raises(InvalidArgument) as err:
            await env.store.update(1, profile, edits, base_version=0, device_id="dev_a")
        assert err.value.reason == reason, err.value.message
    with pytest.raises(PermissionDenied):
        await env.store.update(
            1,
            profiles_pb2.Profile(),
            edit("layout.usage_ranking"),
            base_version=0,
            device_id="dev_a",
        )
    with pytest.raises(FailedPrecondition) as fp:
        await env.store.update(
            1,
            profiles_pb2.Profile(time_zone="UTC"),
            edit("time_zone"),
            base_version=9,
            device_id="dev_a",
        )
    assert fp.value.reason == "UNKNOWN_VERSION"
    assert (await env.store.get(1)).version == 0  # nothing was stored


async def test_erasure_destroys_the_data_key_and_export_decrypts(env: Env) -> None:
    await write(env.store, 1, marked(), 1000)
    await write(env.store, 2, marked(), 1000, node="dev_b")
    exported = [r async for r in env.store.export_user(1)]
    assert len(exported) == 1
    assert exported[0]["preferences"]["theme"].startswith(MARKERS["theme"])
    # Erasure deletes the rows of every user_id table, then runs the hooks.
    async with env.db.transaction() as tx:
        for table in ("profile_versions",):
            await tx.execute(f"DELETE FROM {table} WHERE user_id = 1")
    await env.store.erase_user(1)
    assert env.store.keys.vault is not None
    assert await env.store.keys.vault.get(1) is None
    assert await env.store.keys.vault.get(2) is not None
    assert 1 not in env.store.keys.cache
    assert (await env.store.get(1)).version == 0
    assert [r async for r in env.store.export_user(1)] == []
    assert (await env.store.get(2)).version == 1  # others untouched

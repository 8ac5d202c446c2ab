"""`pulsesync keys ...`: administer the profile key-encryption key.

    pulsesync keys rotate [--data-dir D] [--db FILE] [--key-file FILE]

Rotation adds a new key-encryption key to the key file, re-wraps every user's data key
under it in one transaction (profiles themselves are not re-encrypted, so every stored
version stays readable), then removes the retired key from the file once no data key uses
it. It works on the files directly, with the server stopped or running.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pulsesync.server.clock import SystemClock
from pulsesync.server.config import env
from pulsesync.server.profiles.crypto import FileKeyStore, WrappedKey, data_key_context
from pulsesync.server.profiles.store import ProfileStore
from pulsesync.server.storage.db import Database


@dataclass(frozen=True, slots=True)
class Rotation:
    """What a rotation did."""

    new_kek_id: str
    rewrapped: int
    removed: tuple[str, ...]


async def rotate(db: Database, keystore: FileKeyStore, now_us: int) -> Rotation:
    """Introduce a new KEK and re-wrap every data key under it (see module docstring)."""
    new_id = keystore.add_primary()
    async with db.transaction() as tx:
        async with tx.execute(
            "SELECT user_id, key_id, kek_id, wrapped_key FROM profile_keys WHERE kek_id != ?",
            (new_id,),
        ) as cur:
            rows = list(await cur.fetchall())
        for user_id, key_id, kek_id, blob in rows:
            context = data_key_context(int(user_id), str(key_id))
            key = await keystore.unwrap(WrappedKey(str(kek_id), bytes(blob)), context)
            wrapped = await keystore.wrap(key, context)
            await tx.execute(
                "UPDATE profile_keys SET kek_id = ?, wrapped_key = ?, wrap_us = ? WHERE user_id = ?",
                (wrapped.kek_id, wrapped.blob, now_us, user_id),
            )
    async with db.reader.execute("SELECT DISTINCT kek_id FROM profile_keys") as cur:
        in_use = {str(r[0]) for r in await cur.fetchall()}
    retired = set(keystore.key_ids()) - in_use - {new_id}
    keystore.drop(retired)
    return Rotation(new_id, len(rows), tuple(sorted(retired)))


async def cmd_rotate(args: argparse.Namespace) -> int:
    from pulsesync.server.cli import config_from

    config = config_from(args)
    async with await Database.open(config.database) as db:
        # Opening the store checks that the key file fits the database before touching it.
        store = await ProfileStore.open(config, db, SystemClock())
        assert isinstance(store.keystore, FileKeyStore)
        done = await rotate(db, store.keystore, SystemClock().now_us())
    print(f"new key-encryption key {done.new_kek_id} in {config.kek_file}")
    print(f"re-wrapped {done.rewrapped} profile data key(s); profiles were not re-encrypted")
    if done.removed:
        print(f"removed retired key(s) {', '.join(done.removed)} from the key file")
    print("back up the key file now, apart from the database")
    return 0


def register(sub: Any) -> None:
    """Add the `keys` command group to the `pulsesync` CLI."""
    from pulsesync.server.cli import add_storage_flags

    keys = sub.add_parser("keys", help="manage the profile encryption keys").add_subparsers(
        dest="keys_cmd", required=True
    )
    p = keys.add_parser(
        "rotate", help="new key-encryption key; re-wrap every data key (profiles stay readable)"
    )
    add_storage_flags(p)
    p.add_argument(
        "--key-file",
        type=Path,
        default=Path(v) if (v := env("KEY_FILE")) else None,
        help="profile key-encryption key file (env PULSESYNC_KEY_FILE; default DATA_DIR/kek.key)",
    )
    p.set_defaults(handler=cmd_rotate)

"""`pulsesync keys ...`: administer the profile key-encryption key.

    pulsesync keys rotate [--data-dir D] [--db FILE | --database URL] [--key-file FILE]
                          [--key-vault FILE_OR_URL]

Rotation adds a new key-encryption key to the key file, re-wraps every user's data key in
the key vault under it in one transaction (profiles themselves are not re-encrypted, so every stored
version stays readable), then removes the retired key from the file once no data key uses
it. It works on the key file and the key vault directly (a SQLite file, or a PostgreSQL
database of its own), with the servers stopped or running; the vault is opened as a server
opens it, so a key file or vault that does not fit the database is refused first.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from pulsesync.server.clock import SystemClock
from pulsesync.server.profiles.crypto import FileKeyStore, data_key_context
from pulsesync.server.storage.backend import open_storage
from pulsesync.server.storage.keys import KeyVaultStorage

# Re-wrap passes: a key added by a running server during a pass under the old primary is
# picked up by the next; two are enough, more only bound the loop.
_REWRAP_ROUNDS: Final = 4


@dataclass(frozen=True, slots=True)
class Rotation:
    """What a rotation did."""

    new_kek_id: str
    rewrapped: int
    removed: tuple[str, ...]


async def rotate(vault: KeyVaultStorage, keystore: FileKeyStore, now_us: int) -> Rotation:
    """Introduce a new KEK and re-wrap every data key under it (see module docstring)."""
    new_id = keystore.add_primary()
    rewrapped = 0
    for _ in range(_REWRAP_ROUNDS):
        pending = [k for k in await vault.all() if k.wrapped.kek_id != new_id]
        if not pending:
            break
        updates = []
        for key in pending:
            context = data_key_context(key.user_id, key.key_id)
            data_key = await keystore.unwrap(key.wrapped, context)
            updates.append((key, await keystore.wrap(data_key, context)))
        # Compare-and-set per row: a key erased or re-wrapped meanwhile is left alone.
        rewrapped += await vault.replace_wrapped(updates, now_us)
    in_use = set(await vault.kek_counts())
    retired = set(keystore.key_ids()) - in_use - {new_id}
    keystore.drop(retired)
    # The old wraps are useless without the retired KEK; compact anyway so none linger.
    await vault.compact()
    return Rotation(new_id, rewrapped, tuple(sorted(retired)))


async def cmd_rotate(args: argparse.Namespace) -> int:
    from pulsesync.server.cli import config_from
    from pulsesync.server.compose import open_storage_profile_store

    config = config_from(args)
    closers: list[Callable[[], Awaitable[None]]] = []
    async with open_storage(config.store) as storage:
        try:
            # Opening the store checks that the key file and vault fit the database first.
            store = await open_storage_profile_store(
                config, storage, SystemClock(), closers=closers
            )
            keystore, vault = store.keys.keystore, store.keys.vault
            assert isinstance(keystore, FileKeyStore)
            done = await rotate(vault, keystore, SystemClock().now_us())
        finally:
            for close in reversed(closers):  # the PostgreSQL key vault's connections
                await close()
    print(f"new key-encryption key {done.new_kek_id} in {keystore.path}")
    print(
        f"re-wrapped {done.rewrapped} profile data key(s) in {vault.path}; "
        "profiles were not re-encrypted"
    )
    if done.removed:
        print(f"removed retired key(s) {', '.join(done.removed)} from the key file")
    print("back up the key file now, apart from the database")
    return 0


def register(sub: Any) -> None:
    """Add the `keys` command group to the `pulsesync` CLI."""
    from pulsesync.server.cli import add_key_flags, add_storage_flags

    keys = sub.add_parser("keys", help="manage the profile encryption keys").add_subparsers(
        dest="keys_cmd", required=True
    )
    p = keys.add_parser(
        "rotate", help="new key-encryption key; re-wrap every data key (profiles stay readable)"
    )
    add_storage_flags(p)
    add_key_flags(p)
    p.set_defaults(handler=cmd_rotate)

"""Profile data keys: one per person, wrapped by the key file's KEK and kept in the key vault.

`DataKeys.open` checks at start that the key file fits the vault (a wrong or missing key file
refuses to start with what to do); afterwards it hands the profile store each person's
unwrapped key, creating it (durably, in the vault) before the person's first version.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from pulsesync.server.profiles.crypto import (
    KEY_BYTES,
    FileKeyStore,
    KeyFileError,
    KeyStore,
    ProfileIntegrityError,
    data_key_context,
)
from pulsesync.server.storage.keys import KeyVaultStorage, VaultKey
from pulsesync.server.storage.profiles import ProfileStorage

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DataKey:
    key_id: str
    key: bytes


class KeyTaken(Exception):
    """Another process gave the person a data key first: use that one."""


class DataKeys:
    """Each person's unwrapped data key, cached; created on first use."""

    def __init__(self, keystore: KeyStore, vault: KeyVaultStorage) -> None:
        self.keystore = keystore
        self.vault = vault
        self.cache: dict[int, DataKey] = {}

    @classmethod
    async def open(
        cls,
        kek_file: Path,
        vault: KeyVaultStorage,
        profiles: ProfileStorage,
        *,
        must_exist: bool = False,
    ) -> DataKeys:
        """The keys for a server: open (or create) the key file and check it fits the vault.

        PULSESYNC_KEK, when set, gives the keys instead of the file. must_exist: never create
        a key file (several replicas must share one set of keys, not make one each)."""
        wrapped = await vault.kek_counts()
        in_use = sum(wrapped.values())
        from_env = FileKeyStore.from_env()
        if from_env is not None:
            keystore, kek_file = from_env, from_env.path
        else:
            if (in_use or must_exist) and not await asyncio.to_thread(kek_file.exists):
                raise KeyFileError(
                    f"the key vault {vault.path} holds {in_use} profile data key(s) wrapped "
                    f"by {', '.join(sorted(wrapped)) or 'no key yet'}, but the key file "
                    f"{kek_file} does not exist. Restore it from your backup and point "
                    "--key-file (or PULSESYNC_KEY_FILE) at it, or give its content in "
                    "PULSESYNC_KEK; without it the stored profiles cannot be decrypted."
                )
            keystore, created = FileKeyStore.open(kek_file, must_exist=False)
            if created:
                log.info("created profile key file", extra={"path": str(kek_file)})
        missing = set(wrapped) - keystore.key_ids()
        if missing:
            raise KeyFileError(
                f"the key file {kek_file} does not hold {', '.join(sorted(missing))}, which "
                f"wraps the profile data keys in {vault.path}: it is the wrong key file for "
                "this database. Point --key-file (or PULSESYNC_KEY_FILE) at the key file this "
                "database was used with."
            )
        keys = cls(keystore, vault)
        await keys._verify(kek_file)
        await keys._report_unkeyed(profiles)
        return keys

    async def _verify(self, path: Path) -> None:
        """Unwrap one data key per KEK: a key file that does not fit refuses to start."""
        samples: dict[str, int] = {}
        for key in await self.vault.all():
            samples.setdefault(key.wrapped.kek_id, key.user_id)
        for kek_id, user_id in sorted(samples.items()):
            try:
                await self.get(user_id)
            except ProfileIntegrityError:
                raise KeyFileError(
                    f"the key file {path} does not unwrap the profile data keys wrapped by "
                    f"{kek_id} (user {user_id}) in {self.vault.path}: the key file or the "
                    "key vault was altered. Restore the matching key file or key vault from "
                    "backup."
                ) from None

    async def _report_unkeyed(self, profiles: ProfileStorage) -> None:
        """Log people whose profile ciphertext has no data key: erased after this database
        was backed up (restored backup), so their profile reads as erased."""
        unkeyed = sorted(await profiles.users_with_versions() - await self.vault.user_ids())
        if unkeyed:
            log.warning(
                "profiles without a data key in the key vault: these people were erased after "
                "the database was backed up, or the vault is older than the database; their "
                "profiles cannot be decrypted. Erase them again (`pulsesync privacy erase`) "
                "to remove the rest of their data from this restored database",
                extra={"users": unkeyed[:50], "count": len(unkeyed), "vault": str(self.vault.path)},
            )

    async def get(self, user_id: int) -> DataKey | None:
        """The person's key (None if they have none: never written, or erased)."""
        cached = self.cache.get(user_id)
        if cached is not None:
            return cached
        stored = await self.vault.get(user_id)
        if stored is None:
            return None
        key = await self.keystore.unwrap(stored.wrapped, data_key_context(user_id, stored.key_id))
        dk = DataKey(stored.key_id, key)
        self.cache[user_id] = dk
        return dk

    async def create(self, user_id: int, now_us: int) -> DataKey:
        """A fresh data key, stored wrapped in the vault (durably) before anything uses it;
        KeyTaken if another process stored one first."""
        dk = DataKey("dk_" + secrets.token_hex(8), secrets.token_bytes(KEY_BYTES))
        wrapped = await self.keystore.wrap(dk.key, data_key_context(user_id, dk.key_id))
        if not await self.vault.add(VaultKey(user_id, dk.key_id, wrapped, now_us, now_us)):
            raise KeyTaken
        return dk

    async def discard_unused(self, user_id: int, key_id: str, profiles: ProfileStorage) -> None:
        """Remove a key made for a write that failed (e.g. the person was erased meanwhile),
        unless a version of another writer uses it, so no orphan key outlives an erasure."""
        if await profiles.key_in_use(user_id, key_id):
            return
        await self.vault.discard(user_id, key_id)

    def remember(self, user_id: int, dk: DataKey) -> None:
        self.cache[user_id] = dk

    def forget(self, user_id: int) -> DataKey | None:
        return self.cache.pop(user_id, None)

    async def shred(self, user_id: int) -> None:
        """Destroy the person's key in the vault, so no copy of it remains there."""
        self.cache.pop(user_id, None)
        shredded = await self.vault.shred(user_id)
        if shredded.checkpoint_busy:
            log.warning(
                "the key vault's log stayed busy after an erasure; the wrapped key is "
                "deleted but its old page stays in the log until the next checkpoint",
                extra={"vault": str(self.vault.path)},
            )

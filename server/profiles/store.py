"""The profile store: merged, versioned, encrypted profiles, and a watch per device.

Other server components read a person's profile through `app.profiles` (a `ProfileStore`):

    profile = await app.profiles.get(user_id)   # decrypted latest; version 0 if none yet
    profile.quiet_hours, profile.time_zone, profile.goals, profile.muted_nudge_types

Every write merges field by field (see `document`), commits version N+1 with compare-and-set
on N, and notifies open watches. Versions are appended, each sealed under the user's data key
(see `crypto`); the latest `MAX_RETAINED_VERSIONS` are kept so a reconnecting device can
catch up without gaps.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict, defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from google.protobuf import json_format

from pulsesync import profile_document as document
from pulsesync.hlc import HybridClock
from pulsesync.profile_document import SERVER_NODE, Entry, State
from pulsesync.server.bus import EventBus
from pulsesync.server.clock import Clock
from pulsesync.server.config import ServerConfig
from pulsesync.server.errors import (
    Aborted,
    FailedPrecondition,
    NotFound,
    PulseSyncError,
    ResourceExhausted,
    document_refusals,
)
from pulsesync.server.privacy.consent import ConsentStore
from pulsesync.server.profiles import upgrade
from pulsesync.server.profiles.crypto import (
    KEY_BYTES,
    AesGcmSealer,
    FileKeyStore,
    KeyFileError,
    KeyStore,
    PlaintextSealer,
    ProfileIntegrityError,
    Sealer,
    data_key_context,
    profile_aad,
)
from pulsesync.server.profiles.layout import UsageRanker
from pulsesync.server.profiles.vault import KeyVault, VaultKey
from pulsesync.server.storage.db import Database
from pulsesync.v1 import profiles_pb2

log = logging.getLogger(__name__)

# Enough history for a device that was offline through a busy day of edits to replay every
# version; beyond that the latest snapshot (a complete state) is what it gets.
MAX_RETAINED_VERSIONS: Final = 64
# A profile is preferences and pointers, not content: 1 MiB leaves room for apps' settings
# blobs (the benchmark uses 256 KiB) while bounding every row and message.
MAX_PROFILE_BYTES: Final = 1024 * 1024
# Decrypted latest profiles kept in memory: the hot set of active people.
MAX_CACHED_PROFILES: Final = 4096
# Device stamps may run this far ahead of the server clock (clock skew); further means a
# broken clock that would win every merge for as long as it stays ahead.
MAX_FUTURE_SKEW_MS: Final = 5 * 60 * 1000
# Undelivered versions one watch may queue before it re-reads from the database instead.
MAX_WATCH_BACKLOG: Final = 256
# Compare-and-set retries when another process committed between our read and write.
_CAS_ATTEMPTS: Final = 3
# Explicit opt-out of encryption for the benchmark's baseline run only (ServerConfig.extra).
PLAINTEXT_BENCHMARK_FLAG: Final = "profiles_plaintext_benchmark_only"


@dataclass(frozen=True, slots=True)
class UpdateResult:
    """The outcome of a write: the merged profile and the edits that lost."""

    profile: profiles_pb2.Profile
    overridden_fields: tuple[str, ...]
    committed: bool


@dataclass(slots=True)
class _Head:
    version: int
    state: State
    profile: profiles_pb2.Profile


@dataclass(frozen=True, slots=True)
class _DataKey:
    key_id: str
    key: bytes


# The baseline benchmark's "key": no encryption, so no key material anywhere.
_PLAINTEXT_KEY: Final = _DataKey("plaintext", bytes(KEY_BYTES))


@dataclass(slots=True, eq=False)
class _Watcher:
    items: deque[profiles_pb2.Profile] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    overflow: bool = False
    error: PulseSyncError | None = None

    def push(self, profile: profiles_pb2.Profile) -> None:
        if len(self.items) >= MAX_WATCH_BACKLOG:
            self.items.clear()
            self.overflow = True
        else:
            self.items.append(profile)
        self.wake.set()

    def fail(self, error: PulseSyncError) -> None:
        self.error = error
        self.wake.set()


CommitListener = Callable[[int, profiles_pb2.Profile], None]


class ProfileStore:
    """Reads, merges, encrypts and versions profiles; see the module docstring."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        keystore: KeyStore | None,
        sealer: Sealer,
        vault: KeyVault | None = None,
    ) -> None:
        if sealer.encrypted and (keystore is None or vault is None):
            raise ValueError("an encrypting sealer needs a KeyStore and a KeyVault")
        self.db = db
        self.clock = clock
        self.keystore = keystore
        self.vault = vault
        self.sealer = sealer
        self.hlc = HybridClock(SERVER_NODE, lambda: clock.now_us() // 1000)
        self._heads: OrderedDict[int, _Head] = OrderedDict()
        self._keys: dict[int, _DataKey] = {}
        self._watchers: dict[int, set[_Watcher]] = defaultdict(set)
        self._listeners: list[CommitListener] = []
        # Profile writes are few (people edit settings, not streams): one lock keeps the
        # read-merge-seal-commit-notify sequence simple and ordered for every user.
        self._lock = asyncio.Lock()
        self.layout: UsageRanker | None = None  # once started
        self._unsubscribe: Callable[[], None] | None = None

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    async def open(cls, config: ServerConfig, db: Database, clock: Clock) -> ProfileStore:
        """The store for a server: open (or create) the key vault and the key file, move data
        keys out of a database of the previous layout, and check that both fit the database."""
        if config.extra.get(PLAINTEXT_BENCHMARK_FLAG) == "yes":
            if await _has_ciphertext(db) or await upgrade.legacy_keys(db):
                raise KeyFileError(
                    "this database holds encrypted profiles; the plaintext benchmark mode "
                    "needs a fresh database"
                )
            return cls(db, clock, None, PlaintextSealer())
        vault = await upgrade.open_vault(config, db, clock.now_us())
        wrapped = await vault.kek_counts()
        path = config.kek_file
        in_use = sum(wrapped.values())
        if in_use and not path.exists():
            raise KeyFileError(
                f"the key vault {vault.path} holds {in_use} profile data key(s) wrapped "
                f"by {', '.join(sorted(wrapped))}, but the key file {path} does not exist. "
                "Restore it from your backup and point --key-file (or PULSESYNC_KEY_FILE) at "
                "it; without it the stored profiles cannot be decrypted."
            )
        keystore, created = FileKeyStore.open(path, must_exist=False)
        if created:
            log.info("created profile key file", extra={"path": str(path)})
        missing = set(wrapped) - keystore.key_ids()
        if missing:
            raise KeyFileError(
                f"the key file {path} does not hold {', '.join(sorted(missing))}, which wraps "
                f"the profile data keys in {vault.path}: it is the wrong key file for this "
                "database. Point --key-file (or PULSESYNC_KEY_FILE) at the key file this "
                "database was used with."
            )
        store = cls(db, clock, keystore, AesGcmSealer(), vault)
        await store._verify_keys(path)
        await store._report_unkeyed()
        return store

    async def _verify_keys(self, path: object) -> None:
        """Unwrap one data key per KEK: a key file that does not fit refuses to start."""
        assert self.vault is not None
        samples: dict[str, int] = {}
        for key in await self.vault.all():
            samples.setdefault(key.wrapped.kek_id, key.user_id)
        for kek_id, user_id in sorted(samples.items()):
            try:
                await self._data_key(user_id)
            except ProfileIntegrityError:
                raise KeyFileError(
                    f"the key file {path} does not unwrap the profile data keys wrapped by "
                    f"{kek_id} (user {user_id}) in {self.vault.path}: the key file or the "
                    "key vault was altered. Restore the matching key file or key vault from "
                    "backup."
                ) from None

    async def _report_unkeyed(self) -> None:
        """Log people whose profile ciphertext has no data key: erased after this database
        was backed up (restored backup), so their profile reads as erased."""
        assert self.vault is not None
        async with self.db.reader.execute("SELECT DISTINCT user_id FROM profile_versions") as cur:
            with_profiles = {int(r[0]) for r in await cur.fetchall()}
        unkeyed = sorted(with_profiles - await self.vault.user_ids())
        if unkeyed:
            log.warning(
                "profiles without a data key in the key vault: these people were erased after "
                "the database was backed up, or the vault is older than the database; their "
                "profiles cannot be decrypted. Erase them again (`pulsesync privacy erase`) "
                "to remove the rest of their data from this restored database",
                extra={"users": unkeyed[:50], "count": len(unkeyed), "vault": str(self.vault.path)},
            )

    # -- reading -----------------------------------------------------------------------------
    async def get(self, user_id: int) -> profiles_pb2.Profile:
        """The user's latest profile, decrypted (an empty one with version 0 if none yet)."""
        head = await self._head(user_id)
        out = profiles_pb2.Profile()
        out.CopyFrom(head.profile)
        return out

    async def version(self, user_id: int) -> int:
        """The user's latest profile version (0 if none)."""
        return (await self._head(user_id)).version

    async def get_version(self, user_id: int, version: int) -> profiles_pb2.Profile:
        """One retained version, decrypted (NotFound if it never existed or was pruned)."""
        async with self.db.reader.execute(
            "SELECT version, key_id, nonce, ciphertext FROM profile_versions"
            " WHERE user_id = ? AND version = ?",
            (user_id, version),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            raise NotFound(
                f"profile version {version} is not retained; read the latest with GetProfile",
                reason="PROFILE_VERSION_NOT_FOUND",
            )
        return await self._open_row(user_id, row)

    async def versions_after(self, user_id: int, after: int) -> list[profiles_pb2.Profile]:
        """The retained versions newer than `after`, oldest first, decrypted."""
        async with self.db.reader.execute(
            "SELECT version, key_id, nonce, ciphertext FROM profile_versions"
            " WHERE user_id = ? AND version > ? ORDER BY version",
            (user_id, after),
        ) as cur:
            rows = await cur.fetchall()
        return [await self._open_row(user_id, row) for row in rows]

    # -- writing -----------------------------------------------------------------------------
    async def update(
        self,
        user_id: int,
        profile: profiles_pb2.Profile,
        edits: Iterable[profiles_pb2.ProfileEdit],
        *,
        base_version: int,
        device_id: str,
    ) -> UpdateResult:
        """Merge a device's stamped edits (values in `profile`) and commit a new version."""
        max_wall = self.clock.now_us() // 1000 + MAX_FUTURE_SKEW_MS
        with document_refusals():
            delta = document.delta_of(profile, edits, node_id=device_id, max_wall_ms=max_wall)
        return await self._commit(user_id, delta, base_version=base_version, device_id=device_id)

    async def edit(
        self, user_id: int, mutate: Callable[[profiles_pb2.Profile], None]
    ) -> UpdateResult:
        """A server-side edit: mutate a copy of the latest profile; changed fields are
        stamped by the server's clock and merged like any device's edit."""
        head = await self._head(user_id)
        draft = profiles_pb2.Profile()
        draft.CopyFrom(head.profile)
        mutate(draft)
        values = document.fields_of(draft)
        delta: State = {}
        for path in document.diff(head.state, values):
            delta[path] = Entry(self.hlc.tick(), values.get(path))
        if not delta:
            return UpdateResult(await self.get(user_id), (), False)
        with document_refusals():
            document.validate(draft, delta)
        return await self._commit(user_id, delta, base_version=head.version, device_id=SERVER_NODE)

    async def _commit(
        self, user_id: int, delta: Mapping[str, Entry], *, base_version: int, device_id: str
    ) -> UpdateResult:
        for entry in delta.values():
            self.hlc.observe(entry.stamp)
        async with self._lock:
            for attempt in range(_CAS_ATTEMPTS):
                head = await self._head(user_id)
                if base_version > head.version:
                    raise FailedPrecondition(
                        f"base_version {base_version} is newer than the latest profile version "
                        f"{head.version} (was the server restored from a backup?); send the "
                        "edits again with base_version 0",
                        reason="UNKNOWN_VERSION",
                    )
                state, lost = document.apply(head.state, delta)
                if state == head.state:
                    return UpdateResult(await self.get(user_id), tuple(lost), False)
                if len(state) > document.MAX_PATHS:
                    raise ResourceExhausted(
                        f"the profile would have more than {document.MAX_PATHS} fields and "
                        "items; remove continuity items or settings that are no longer used",
                        reason="PROFILE_TOO_LARGE",
                    )
                try:
                    new = await self._append(user_id, head.version, state, device_id)
                except _Conflict:
                    self._heads.pop(user_id, None)
                    log.info("profile compare-and-set lost; retrying", extra={"try": attempt})
                    continue
                self._remember(user_id, new)
                self._notify(user_id, new.profile)
                out = profiles_pb2.Profile()
                out.CopyFrom(new.profile)
                return UpdateResult(out, tuple(lost), True)
        raise Aborted(
            "the profile changed concurrently several times; retry the update",
            reason="PROFILE_CONFLICT",
        )

    async def _append(self, user_id: int, base: int, state: State, device_id: str) -> _Head:
        version = base + 1
        profile = document.build(state)
        profile.version = version
        profile.update_time.FromMicroseconds(self.clock.now_us())
        profile.update_device_id = device_id
        plaintext = profile.SerializeToString(deterministic=True)
        if len(plaintext) > MAX_PROFILE_BYTES:
            raise ResourceExhausted(
                f"the profile would be {len(plaintext)} bytes; at most {MAX_PROFILE_BYTES} are "
                "stored. Keep large content in the app and only pointers in the profile",
                reason="PROFILE_TOO_LARGE",
            )
        dk = self._keys.get(user_id) or await self._load_key(user_id)
        created = dk is None
        if dk is None:
            dk = await self._new_key(user_id)
        nonce, ciphertext = self.sealer.seal(
            dk.key, plaintext, profile_aad(user_id, version, dk.key_id)
        )
        now = self.clock.now_us()
        try:
            async with self.db.transaction() as tx:
                async with tx.execute(
                    "SELECT MAX(version) FROM profile_versions WHERE user_id = ?", (user_id,)
                ) as cur:
                    row = await cur.fetchone()
                if int((row[0] if row else None) or 0) != base:
                    raise _Conflict
                await tx.execute(
                    "INSERT INTO profile_versions (user_id, version, key_id, nonce, ciphertext,"
                    " device_id, create_us) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (user_id, version, dk.key_id, nonce, ciphertext, device_id, now),
                )
                await tx.execute(
                    "DELETE FROM profile_versions WHERE user_id = ? AND version <= ?",
                    (user_id, version - MAX_RETAINED_VERSIONS),
                )
        except _Conflict:
            raise  # another writer won; the new key (if any) is the person's key, keep it
        except Exception:
            if created:
                await self._discard_unused_key(user_id, dk.key_id)
            raise
        self._keys[user_id] = dk
        return _Head(version, state, profile)

    async def _new_key(self, user_id: int) -> _DataKey:
        """A fresh data key, stored wrapped in the vault (durably) before anything uses it."""
        if self.keystore is None or self.vault is None:
            return _PLAINTEXT_KEY
        dk = _DataKey("dk_" + secrets.token_hex(8), secrets.token_bytes(KEY_BYTES))
        wrapped = await self.keystore.wrap(dk.key, data_key_context(user_id, dk.key_id))
        now = self.clock.now_us()
        if not await self.vault.add(VaultKey(user_id, dk.key_id, wrapped, now, now)):
            raise _Conflict  # another process gave the person a key first: use that one
        return dk

    async def _discard_unused_key(self, user_id: int, key_id: str) -> None:
        """Remove a key made for a write that failed (e.g. the person was erased meanwhile),
        unless a version of another writer uses it, so no orphan key outlives an erasure."""
        if self.vault is None:
            return
        async with self.db.reader.execute(
            "SELECT 1 FROM profile_versions WHERE user_id = ? AND key_id = ? LIMIT 1",
            (user_id, key_id),
        ) as cur:
            if await cur.fetchone() is not None:
                return
        await self.vault.discard(user_id, key_id)

    # -- watching ----------------------------------------------------------------------------
    async def watch(self, user_id: int, after_version: int) -> AsyncIterator[profiles_pb2.Profile]:
        """Every retained version after `after_version` (only the latest when it is 0), then
        each new one as it is committed."""
        watcher = _Watcher()
        # Subscribe before reading, so a version committed in between is queued, not missed.
        self._watchers[user_id].add(watcher)
        try:
            head = await self._head(user_id)
            if after_version > head.version:
                raise FailedPrecondition(
                    f"after_version {after_version} is newer than the latest profile version "
                    f"{head.version} (was the server restored from a backup?); watch again "
                    "with after_version 0",
                    reason="UNKNOWN_VERSION",
                )
            last = after_version
            if after_version == 0:
                # A device with nothing needs only the latest snapshot (a complete state).
                if head.version:
                    yield await self.get(user_id)
                    last = head.version
            else:
                for profile in await self.versions_after(user_id, last):
                    yield profile
                    last = profile.version
            while True:
                await watcher.wake.wait()
                watcher.wake.clear()
                if watcher.error is not None:
                    raise watcher.error
                if watcher.overflow:
                    watcher.overflow = False
                    watcher.items.clear()
                    for profile in await self.versions_after(user_id, last):
                        yield profile
                        last = profile.version
                while watcher.items:
                    profile = watcher.items.popleft()
                    if profile.version <= last:
                        continue
                    if profile.version > last + 1:  # cannot happen in-process; be safe
                        for missed in await self.versions_after(user_id, last):
                            if missed.version < profile.version:
                                yield missed
                    yield profile
                    last = profile.version
        finally:
            watchers = self._watchers.get(user_id)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._watchers[user_id]

    def interrupt_watches(self, user_id: int, error: PulseSyncError) -> None:
        """End every open watch of the user with error (e.g. consent withdrawn)."""
        for watcher in list(self._watchers.get(user_id, ())):
            watcher.fail(error)

    def on_commit(self, fn: CommitListener) -> Callable[[], None]:
        """Call fn(user_id, profile) after each committed version; returns an unsubscribe.
        fn runs on the write path: keep it quick and do not mutate the profile."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn)

    def _notify(self, user_id: int, profile: profiles_pb2.Profile) -> None:
        for watcher in list(self._watchers.get(user_id, ())):
            watcher.push(profile)
        for fn in list(self._listeners):
            try:
                fn(user_id, profile)
            except Exception:
                log.exception("profile commit listener failed")

    # -- adaptive layout ---------------------------------------------------------------------
    async def start(self, bus: EventBus, consent: ConsentStore) -> None:
        """Feed committed usage events into the adaptive layout ranking."""
        ranker = UsageRanker(self, consent)
        self.layout = ranker
        self._unsubscribe = bus.subscribe(ranker.on_events)
        ranker.start()

    async def stop(self) -> None:
        """Stop the layout ranking."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self.layout is not None:
            await self.layout.stop()

    # -- privacy -----------------------------------------------------------------------------
    async def erase_user(self, user_id: int) -> None:
        """Crypto-shred: destroy the user's data key in the vault (and compact it, so no copy
        of the wrapped key remains), delete their rows, drop caches, end watches."""
        async with self._lock:
            if self.vault is not None:
                shredded = await self.vault.shred(user_id)
                if shredded.checkpoint_busy:
                    log.warning(
                        "the key vault's log stayed busy after an erasure; the wrapped key is "
                        "deleted but its old page stays in the log until the next checkpoint",
                        extra={"vault": str(self.vault.path)},
                    )
            async with self.db.writer.execute("PRAGMA secure_delete") as cur:
                row = await cur.fetchone()
            before = int(row[0]) if row else 0
            await self.db.writer.execute("PRAGMA secure_delete = ON")
            try:
                async with self.db.transaction() as tx:
                    for table in ("profile_versions", "profile_feature_usage"):
                        await tx.execute(f"DELETE FROM {table} WHERE user_id = ?", (user_id,))
            finally:
                await self.db.writer.execute(f"PRAGMA secure_delete = {before}")
            key = self._keys.pop(user_id, None)
            if key is not None:
                self.sealer.forget(key.key)
            self._heads.pop(user_id, None)
            if self.layout is not None:
                self.layout.forget_user(user_id)
            self.interrupt_watches(
                user_id, NotFound("this person's profile was erased", reason="PROFILE_ERASED")
            )

    async def export_user(self, user_id: int) -> AsyncIterator[dict[str, Any]]:
        """The decrypted latest profile, as a JSON-ready dict (nothing if none)."""
        head = await self._head(user_id)
        if head.version:
            yield json_format.MessageToDict(head.profile, preserving_proto_field_name=True)

    def forget_caches(self) -> None:
        """Drop every decrypted profile and data key held in memory."""
        self._heads.clear()
        self._keys.clear()

    # -- internals ---------------------------------------------------------------------------
    async def _head(self, user_id: int) -> _Head:
        head = self._heads.get(user_id)
        if head is not None:
            self._heads.move_to_end(user_id)
            return head
        async with self.db.reader.execute(
            "SELECT version, key_id, nonce, ciphertext FROM profile_versions"
            " WHERE user_id = ? ORDER BY version DESC LIMIT 1",
            (user_id,),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            head = _Head(0, {}, profiles_pb2.Profile())
        else:
            profile = await self._open_row(user_id, row)
            head = _Head(profile.version, document.state_of(profile), profile)
            for entry in head.state.values():
                self.hlc.observe(entry.stamp)
        self._remember(user_id, head)
        return head

    def _remember(self, user_id: int, head: _Head) -> None:
        self._heads[user_id] = head
        self._heads.move_to_end(user_id)
        while len(self._heads) > MAX_CACHED_PROFILES:
            self._heads.popitem(last=False)

    async def _load_key(self, user_id: int) -> _DataKey | None:
        if self.keystore is None or self.vault is None:
            return _PLAINTEXT_KEY
        stored = await self.vault.get(user_id)
        if stored is None:
            return None
        key = await self.keystore.unwrap(stored.wrapped, data_key_context(user_id, stored.key_id))
        dk = _DataKey(stored.key_id, key)
        self._keys[user_id] = dk
        return dk

    async def _data_key(self, user_id: int) -> _DataKey | None:
        return self._keys.get(user_id) or await self._load_key(user_id)

    async def _open_row(self, user_id: int, row: Any) -> profiles_pb2.Profile:
        version, key_id, nonce, ciphertext = int(row[0]), str(row[1]), row[2], row[3]
        dk = await self._data_key(user_id)
        what = f"profile version {version} of user {user_id}"
        if dk is None:
            raise ProfileIntegrityError(
                f"{what} has no data key (it was erased or the key row was removed); the "
                "profile cannot be read",
                reason="PROFILE_KEY_MISSING",
            )
        if dk.key_id != key_id:
            raise ProfileIntegrityError(
                f"{what} names data key {key_id}, but the user's key is {dk.key_id}: the row "
                "was altered or copied from another user; restore the database from a backup"
            )
        try:
            plaintext = self.sealer.open(
                dk.key, bytes(nonce), bytes(ciphertext), profile_aad(user_id, version, key_id)
            )
        except InvalidTag:
            raise ProfileIntegrityError(
                f"{what} failed authentication: the stored ciphertext was altered, swapped with "
                "another user's or replayed from another version. Nothing was decrypted; "
                "restore the database from a backup"
            ) from None
        profile = profiles_pb2.Profile.FromString(plaintext)
        if profile.version != version:
            raise ProfileIntegrityError(f"{what} holds version {profile.version}")
        return profile


class _Conflict(Exception):
    """Another writer committed first (compare-and-set lost)."""


async def _has_ciphertext(db: Database) -> bool:
    async with db.reader.execute("SELECT 1 FROM profile_versions LIMIT 1") as cur:
        return await cur.fetchone() is not None

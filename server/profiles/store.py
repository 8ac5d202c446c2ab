"""The profile store: merged, versioned, encrypted profiles, and a watch per device.

Other server components are given the one `ProfileStore` by the composition root
(`pulsesync.server.compose`) and read a person's profile through it:

    profile = await profiles.get(user_id)   # decrypted latest; version 0 if none yet
    profile.quiet_hours, profile.time_zone, profile.goals, profile.muted_nudge_types

Every write merges field by field (see `document`), commits version N+1 with compare-and-set
on N, and notifies open watches (`watch`). Versions are appended, each sealed by the injected
`Sealer` under the user's data key (`keys`); the latest `MAX_RETAINED_VERSIONS` are kept so a
reconnecting device can catch up without gaps.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from google.protobuf import json_format

from pulsesync import profile_document as document
from pulsesync.hlc import HybridClock
from pulsesync.profile_document import SERVER_NODE, Entry, State
from pulsesync.server.clock import Clock
from pulsesync.server.errors import (
    Aborted,
    FailedPrecondition,
    NotFound,
    PulseSyncError,
    ResourceExhausted,
    document_refusals,
)
from pulsesync.server.profiles.crypto import ProfileIntegrityError, Sealer, profile_aad
from pulsesync.server.profiles.keys import DataKeys, KeyTaken
from pulsesync.server.profiles.layout import UsageRanker
from pulsesync.server.profiles.watch import ProfileWatches
from pulsesync.server.storage.profiles import ProfileStorage, SealedVersion
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
# Compare-and-set retries when another process committed between our read and write.
_CAS_ATTEMPTS: Final = 3


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


CommitListener = Callable[[int, profiles_pb2.Profile], None]


class ProfileStore:
    """Reads, merges, encrypts and versions profiles; see the module docstring."""

    def __init__(
        self, storage: ProfileStorage, clock: Clock, keys: DataKeys, sealer: Sealer
    ) -> None:
        self._storage = storage
        self.clock = clock
        self.keys = keys
        self.sealer = sealer
        self.hlc = HybridClock(SERVER_NODE, lambda: clock.now_us() // 1000)
        self._heads: OrderedDict[int, _Head] = OrderedDict()
        self._watches = ProfileWatches(self)
        self._listeners: list[CommitListener] = []
        # Profile writes are few (people edit settings, not streams): one lock keeps the
        # read-merge-seal-commit-notify sequence simple and ordered for every user.
        self._lock = asyncio.Lock()
        # The adaptive layout's usage ranking, set by the composition root (it feeds on
        # committed events and writes its ranking through this store).
        self.layout: UsageRanker | None = None

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
        row = await self._storage.version(user_id, version)
        if row is None:
            raise NotFound(
                f"profile version {version} is not retained; read the latest with GetProfile",
                reason="PROFILE_VERSION_NOT_FOUND",
            )
        return await self._open_row(user_id, row)

    async def versions_after(self, user_id: int, after: int) -> list[profiles_pb2.Profile]:
        """The retained versions newer than `after`, oldest first, decrypted."""
        rows = await self._storage.versions_after(user_id, after)
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
        dk = await self.keys.get(user_id)
        created = dk is None
        if dk is None:
            try:
                dk = await self.keys.create(user_id, self.clock.now_us())
            except KeyTaken:
                raise _Conflict from None  # another process gave the person a key first
        sealed_version = SealedVersion(
            version,
            dk.key_id,
            *self.sealer.seal(dk.key, plaintext, profile_aad(user_id, version, dk.key_id)),
        )
        now = self.clock.now_us()
        try:
            committed = await self._storage.append(
                user_id, base, sealed_version, device_id, now, MAX_RETAINED_VERSIONS
            )
        except Exception:
            if created:
                await self.keys.discard_unused(user_id, dk.key_id, self._storage)
            raise
        if not committed:
            raise _Conflict  # another writer won; the new key (if any) is the person's, keep it
        self.keys.remember(user_id, dk)
        return _Head(version, state, profile)

    # -- watching ----------------------------------------------------------------------------
    def watch(self, user_id: int, after_version: int) -> AsyncIterator[profiles_pb2.Profile]:
        """Every retained version after `after_version` (only the latest when it is 0), then
        each new one as it is committed."""
        return self._watches.watch(user_id, after_version)

    def interrupt_watches(self, user_id: int, error: PulseSyncError) -> None:
        """End every open watch of the user with error (e.g. consent withdrawn)."""
        self._watches.interrupt(user_id, error)

    def changed_elsewhere(self, user_id: int | None) -> None:
        """Another replica committed versions of the person (of anyone, for None): drop the
        cached head and let open watches read the new versions from storage."""
        if user_id is None:
            self._heads.clear()
        else:
            self._heads.pop(user_id, None)
        self._watches.reread(user_id)

    def on_commit(self, fn: CommitListener) -> Callable[[], None]:
        """Call fn(user_id, profile) after each committed version; returns an unsubscribe.
        fn runs on the write path: keep it quick and do not mutate the profile."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn)

    def _notify(self, user_id: int, profile: profiles_pb2.Profile) -> None:
        self._watches.push(user_id, profile)
        for fn in list(self._listeners):
            try:
                fn(user_id, profile)
            except Exception:
                log.exception("profile commit listener failed")

    # -- privacy -----------------------------------------------------------------------------
    async def erase_user(self, user_id: int) -> None:
        """Crypto-shred: destroy the user's data key in the vault (and compact it, so no copy
        of the wrapped key remains), delete their rows, drop caches, end watches."""
        async with self._lock:
            key = self.keys.cache.get(user_id)
            await self.keys.shred(user_id)
            await self._storage.erase_user(user_id)
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
        self.keys.cache.clear()

    # -- internals ---------------------------------------------------------------------------
    async def _head(self, user_id: int) -> _Head:
        head = self._heads.get(user_id)
        if head is not None:
            self._heads.move_to_end(user_id)
            return head
        row = await self._storage.latest(user_id)
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

    async def _open_row(self, user_id: int, row: SealedVersion) -> profiles_pb2.Profile:
        version, key_id, nonce, ciphertext = row.version, row.key_id, row.nonce, row.ciphertext
        dk = await self.keys.get(user_id)
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
                dk.key, nonce, ciphertext, profile_aad(user_id, version, key_id)
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

"""Users, devices, pairing codes and bearer tokens.

A device holds a random 256-bit bearer token; the server stores only its SHA-256 (a token
has full entropy, so a fast hash is enough: there is nothing to brute-force). New devices
join with a short-lived, single-use pairing code minted by the admin CLI or by one of the
user's paired devices. Every lookup here returns the user the *token* belongs to: no request
field ever names a user.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pulsesync.server.clock import Clock
from pulsesync.server.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PulseSyncError,
    ResourceExhausted,
    Unauthenticated,
)
from pulsesync.server.storage.errors import DuplicateKey, StorageError
from pulsesync.server.storage.identity import DeviceRecord, IdentityStorage, NewDevice
from pulsesync.v1 import common_pb2

log = logging.getLogger(__name__)

# Ten minutes: long enough to walk to the other device and type it, short enough that a
# code seen over someone's shoulder is soon useless.
PAIRING_CODE_TTL_US: Final = 10 * 60 * 1_000_000
# Crockford-style alphabet without 0/O, 1/I/L, U: unambiguous when read aloud or typed.
_CODE_ALPHABET: Final = "ABCDEFGHJKMNPQRSTVWXYZ23456789"
_CODE_LENGTH: Final = 8  # 30**8 ~ 6.6e11 codes; single use and short-lived.
_TOKEN_PREFIX: Final = "pst_"
MAX_NAME_LENGTH: Final = 100
# last_seen is refreshed at most once a minute: a write per call would put every read RPC
# behind the write lock for a value nobody needs to the second.
TOUCH_INTERVAL_US: Final = 60 * 1_000_000
# A revocation written by another process (the admin CLI) reaches unary calls within this;
# revocations and rotations on other replicas evict at once (on_token_rotated, the cluster).
TOKEN_CACHE_US: Final = 5 * 1_000_000
# After RotateDeviceToken the replaced token still works this long: enough for a device whose
# response was lost to retry with the token it holds, or to finish calls already in flight;
# short, so that a token that leaked and was rotated away soon stops working.
ROTATION_GRACE_US: Final = 10 * 60 * 1_000_000


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a call acts for: resolved from the bearer token, never from the request."""

    user_id: int
    user_name: str
    device_pk: int
    device_id: str
    device_kind: int


__all__ = ["DeviceRecord", "Identity", "IdentityStore"]

_DURATION_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_duration_s(text: str) -> float:
    """Seconds in "90d", "12h", "30m", "45s" or a bare number of seconds (for --max-token-age)."""
    text = text.strip().lower()
    unit = _DURATION_UNITS.get(text[-1:]) if text else None
    number = text[:-1] if unit else text
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90d, 12h, 30m or 3600)") from None
    if not value > 0:
        raise ValueError("a duration must be positive")
    return value


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def normalize_pairing_code(code: str) -> str:
    """Upper-case, dashes and spaces removed: what the person typed, made comparable."""
    return "".join(ch for ch in code.upper() if ch not in "- ")


def _format_code(raw: str) -> str:
    return f"{raw[:4]}-{raw[4:]}"


# Embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069): they reorder what follows.
_BIDI_CONTROLS: Final = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _check_name(name: str, what: str) -> str:
    name = name.strip()
    if not name:
        raise InvalidArgument(f"{what} must not be empty", reason="MISSING_FIELD")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(
            f"{what} is longer than {MAX_NAME_LENGTH} characters", reason="FIELD_TOO_LONG"
        )
    # Names are printed by the admin commands and shown in apps: a control or bidirectional
    # formatting character (a terminal escape, a right-to-left override) would act there.
    # (Zero-width joiners stay allowed: Persian and Indic names and emoji sequences use them.)
    if any(unicodedata.category(ch) == "Cc" or ch in _BIDI_CONTROLS for ch in name):
        raise InvalidArgument(
            f"{what} holds a control or formatting character", reason="INVALID_NAME"
        )
    return name


def _unknown_code() -> PermissionDenied:
    # One message for unknown, used and expired: telling them apart would help a code guesser.
    return PermissionDenied(
        "pairing code is unknown, already used or expired; ask for a new one with "
        "`pulsesync devices pair-code USER`",
        reason="PAIRING_CODE_UNKNOWN_OR_EXPIRED",
    )


# Failed pairing guesses allowed before PairDevice answers RESOURCE_EXHAUSTED. A person who
# mistypes a code a few times is never slowed; a guesser gets a handful of tries a minute.
# With 30**8 codes, each live for ten minutes, the overall limit (across every peer, since
# addresses are cheap) keeps the chance of hitting any one live code below 1e-7 a day.
PAIR_FAILURES_PER_PEER: Final = 5  # burst per peer address
PAIR_PEER_REFILL_S: Final = 12.0  # one more failure allowed per peer every 12 s (5 a minute)
PAIR_FAILURES_OVERALL: Final = 30  # burst across all peers
PAIR_OVERALL_REFILL_S: Final = 1.0  # one more failure overall every second
# Peers tracked at most; the oldest are forgotten (a full bucket is the default anyway).
_MAX_PEERS: Final = 10_000


class _Bucket:
    """A token bucket on an injected clock: `capacity` tokens, one more every `refill_us`."""

    __slots__ = ("at_us", "capacity", "refill_us", "tokens")

    def __init__(self, capacity: int, refill_s: float, now_us: int) -> None:
        self.capacity = capacity
        self.refill_us = int(refill_s * 1_000_000)
        self.tokens = float(capacity)
        self.at_us = now_us

    def level(self, now_us: int) -> float:
        elapsed = max(0, now_us - self.at_us)
        self.tokens = min(self.capacity, self.tokens + elapsed / self.refill_us)
        self.at_us = now_us
        return self.tokens

    def wait_s(self, now_us: int) -> float:
        """Seconds until one token is available."""
        return max(0.0, (1 - self.level(now_us)) * self.refill_us / 1_000_000)


class PairingLimiter:
    """Limits failed PairDevice attempts per peer and overall; a success costs nothing."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        now = clock.now_us()
        self._overall = _Bucket(PAIR_FAILURES_OVERALL, PAIR_OVERALL_REFILL_S, now)
        self._peers: dict[str, _Bucket] = {}

    def _peer(self, peer: str, now: int) -> _Bucket:
        bucket = self._peers.pop(peer, None)
        if bucket is None:
            bucket = _Bucket(PAIR_FAILURES_PER_PEER, PAIR_PEER_REFILL_S, now)
            if len(self._peers) >= _MAX_PEERS:
                del self._peers[next(iter(self._peers))]
        self._peers[peer] = bucket  # most recent last
        return bucket

    def check(self, peer: str) -> None:
        """ResourceExhausted (with the delay to wait) if this peer or everyone failed too often."""
        now = self._clock.now_us()
        for bucket, who in ((self._peer(peer, now), " from this address"), (self._overall, "")):
            if bucket.level(now) < 1:
                wait = bucket.wait_s(now)
                raise ResourceExhausted(
                    f"too many failed pairing attempts{who}; try again in {wait:.0f} s",
                    reason="PAIRING_RATE_LIMITED",
                    retry_delay_s=wait,
                )

    def failed(self, peer: str) -> None:
        """Charge one failed attempt to the peer and to the overall budget."""
        now = self._clock.now_us()
        for bucket in (self._peer(peer, now), self._overall):
            bucket.level(now)
            bucket.tokens = max(0.0, bucket.tokens - 1)


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string ("ipv4:1.2.3.4:5678" -> "ipv4:1.2.3.4")."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


class IdentityStore:
    """Reads and writes users, devices and pairing codes; resolves tokens to identities."""

    def __init__(
        self, storage: IdentityStorage, clock: Clock, *, max_token_age_us: int | None = None
    ) -> None:
        self._storage = storage
        self._clock = clock
        # Operator's limit on a token's age (None: tokens never age out); see authenticate.
        self.max_token_age_us = max_token_age_us
        # token hash -> (identity, expiry), for the hot path (every call authenticates).
        # Revocation and erasure through this server evict entries at once; the expiry bounds
        # how long a revocation made by another process (the admin CLI) takes to apply.
        self._cache: dict[bytes, tuple[Identity, int]] = {}
        self._last_touch: dict[int, int] = {}
        # Called with the device after its token was rotated here, so that the other replicas
        # forget the tokens they cached for it (None: a server of one process).
        self.on_token_rotated: Callable[[int], None] | None = None

    # -- users ---------------------------------------------------------------------------
    async def add_user(self, name: str) -> int:
        """Create a user; AlreadyExists if the name is taken."""
        name = _check_name(name, "user name")
        try:
            return await self._storage.add_user(name, self._clock.now_us())
        except DuplicateKey:
            raise AlreadyExists(f"a user named {name!r} already exists") from None

    async def user_id_by_name(self, name: str) -> int:
        user_id = await self._storage.user_id_by_name(name)
        if user_id is None:
            raise NotFound(f"no user named {name!r}; create one with `pulsesync users add`")
        return user_id

    async def list_users(self) -> list[tuple[int, str, int]]:
        return [(u.user_id, u.name, u.create_us) for u in await self._storage.list_users()]

    # -- pairing -------------------------------------------------------------------------
    async def create_pairing_code(self, user_id: int) -> tuple[str, int]:
        """A fresh single-use code for the user and its expiry (µs)."""
        raw = "".join(secrets.choice(_CODE_ALPHABET) for _ in range(_CODE_LENGTH))
        now = self._clock.now_us()
        expire = now + PAIRING_CODE_TTL_US
        await self._storage.add_pairing_code(hash_secret(raw), user_id, now, expire)
        return _format_code(raw), expire

    async def pair(self, code: str, device_name: str, kind: int) -> tuple[DeviceRecord, str, str]:
        """Trade a pairing code for a new device and its token: (device, token, user name)."""
        device_name = _check_name(device_name, "device_name")
        if kind not in common_pb2.DeviceKind.values() or kind == common_pb2.DEVICE_KIND_UNSPECIFIED:
            raise InvalidArgument(
                "kind must be one of DEVICE_KIND_PHONE, DEVICE_KIND_DESKTOP, DEVICE_KIND_WEARABLE_BRIDGE",
                reason="INVALID_DEVICE_KIND",
            )
        normalized = normalize_pairing_code(code)
        if len(normalized) != _CODE_LENGTH:
            raise InvalidArgument(
                "pairing_code must be 8 letters and digits, e.g. K7QF-M2XD",
                reason="PAIRING_CODE_MALFORMED",
            )
        now = self._clock.now_us()
        # A wrong guess is answered from the read connection: it costs no write and never
        # queues behind the write lock. The check is repeated inside the transaction below.
        found = await self._storage.pairing_code(hash_secret(normalized))
        if found is None or found.used_us is not None or found.expire_us < now:
            raise _unknown_code()
        token = _TOKEN_PREFIX + secrets.token_urlsafe(32)
        device_id = "dev_" + secrets.token_hex(8)
        paired = await self._storage.redeem_pairing_code(
            hash_secret(normalized),
            now,
            NewDevice(device_id, device_name, kind, hash_secret(token)),
        )
        if paired is None:
            raise _unknown_code()
        record = DeviceRecord(
            paired.device_pk, device_id, paired.user_id, device_name, kind, now, None, None, 0
        )
        return record, token, paired.user_name

    # -- tokens --------------------------------------------------------------------------
    async def authenticate(self, token: str) -> Identity:
        """The identity behind a bearer token, or Unauthenticated."""
        key = hash_secret(token)
        now = self._clock.now_us()
        cached = self._cache.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        row = await self._storage.token(key)
        if row is None:
            raise Unauthenticated(
                "unknown device token; pair the device again", reason="TOKEN_UNKNOWN"
            )
        if row.revoke_us is not None:
            raise Unauthenticated("this device was revoked; pair it again", reason="DEVICE_REVOKED")
        if row.is_current:
            valid_until = (
                row.issue_us + self.max_token_age_us if self.max_token_age_us is not None else None
            )
            if valid_until is not None and valid_until <= now:
                raise Unauthenticated(
                    "this device token is older than the server's maximum token age; rotate "
                    "tokens (RotateDeviceToken) well before that age, or pair the device again",
                    reason="TOKEN_EXPIRED",
                )
        else:
            valid_until = row.prev_token_expire_us if row.prev_token_expire_us is not None else now
            if valid_until <= now:
                raise Unauthenticated(
                    "this token was replaced by RotateDeviceToken and its grace period is over; "
                    "use the new token, or pair the device again if it was lost",
                    reason="TOKEN_ROTATED",
                )
        identity = Identity(row.user_id, row.user_name, row.device_pk, row.device_id, row.kind)
        expiry = now + TOKEN_CACHE_US
        self._cache[key] = (identity, expiry if valid_until is None else min(expiry, valid_until))
        return identity

    async def rotate_token(self, me: Identity, token: str) -> tuple[str, int, int]:
        """A new token for the calling device: (token, issue time, old token's expiry).

        The token the call was made with keeps working for ROTATION_GRACE_US. A device whose
        rotation response was lost calls again with that older token: the token it never
        received is replaced and the older one keeps its original grace period.
        """
        key = hash_secret(token)
        now = self._clock.now_us()
        new = _TOKEN_PREFIX + secrets.token_urlsafe(32)
        grace_until = await self._storage.rotate_token(
            me.device_pk, me.user_id, key, hash_secret(new), now, now + ROTATION_GRACE_US
        )
        if grace_until is None:
            raise Unauthenticated("this device was revoked; pair it again", reason="DEVICE_REVOKED")
        # The replaced token's cache entry must not outlive its grace period, and a token
        # replaced by a retried rotation must stop working at once: here and, through the
        # cluster, on every replica that cached it.
        self._cache.pop(key, None)
        self.forget_device(me.device_pk)
        if self.on_token_rotated is not None:
            self.on_token_rotated(me.device_pk)
        return new, now, grace_until

    def forget_device(self, device_pk: int) -> None:
        """Evict a device's cached identity (after revocation, erasure or token rotation)."""
        for key, (ident, _) in list(self._cache.items()):
            if ident.device_pk == device_pk:
                del self._cache[key]

    def forget_user(self, user_id: int) -> None:
        for key, (ident, _) in list(self._cache.items()):
            if ident.user_id == user_id:
                del self._cache[key]

    async def revoked_among(self, device_pks: list[int]) -> dict[int, str]:
        """Which of these devices are cut off, each with its reason (for closing their open
        streams): DEVICE_REVOKED for a revoked device, USER_ERASED for one whose row is gone
        (only erasure deletes devices)."""
        if not device_pks:
            return {}
        rows = await self._storage.revoke_times(device_pks)
        return {
            pk: "USER_ERASED" if pk not in rows else "DEVICE_REVOKED"
            for pk in device_pks
            if pk not in rows or rows[pk] is not None
        }

    # -- devices -------------------------------------------------------------------------
    async def list_devices(self, user_id: int) -> list[DeviceRecord]:
        return await self._storage.list_devices(user_id)

    async def get_device(self, user_id: int, device_id: str) -> DeviceRecord:
        """One of the user's devices; NotFound for other users' devices too."""
        device = await self._storage.get_device(user_id, device_id)
        if device is None:
            raise NotFound(
                f"no device {device_id!r} among this user's devices", reason="DEVICE_NOT_FOUND"
            )
        return device

    async def revoke(self, user_id: int, device_id: str) -> DeviceRecord:
        """Revoke one of the user's devices (idempotent); the caller closes its streams."""
        device = await self.get_device(user_id, device_id)
        if device.revoke_us is None:
            now = self._clock.now_us()
            await self._storage.revoke_device(device.device_pk, user_id, now)
            device = await self.get_device(user_id, device_id)
        self.forget_device(device.device_pk)
        return device

    async def touch(self, device_pk: int) -> None:
        """Record that the device was seen; written at most once per TOUCH_INTERVAL_US."""
        now = self._clock.now_us()
        if now - self._last_touch.get(device_pk, 0) < TOUCH_INTERVAL_US:
            return
        self._last_touch[device_pk] = now
        # Best effort: every call authenticates, and a full disk or a long lock must not turn
        # reads into errors for a value that is only informational. The next touch retries.
        try:
            await self._storage.touch_device(device_pk, now)
        except (StorageError, PulseSyncError) as e:
            log.warning("could not record last_seen of device %d: %s", device_pk, e)

"""The identity domain's storage seam: users, devices, pairing codes and device tokens.

Rows are plain frozen records; each method is one read or one whole transaction, so a second
backend implements the same promises (a redeemed code is used exactly once, a rotation swaps
hashes atomically) without exposing a connection to the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class UserRow:
    user_id: int
    name: str
    create_us: int


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_pk: int
    device_id: str
    user_id: int
    name: str
    kind: int
    pair_us: int
    last_seen_us: int | None
    revoke_us: int | None
    clock_offset_us: int


@dataclass(frozen=True, slots=True)
class PairingCodeRow:
    user_id: int
    expire_us: int
    used_us: int | None


@dataclass(frozen=True, slots=True)
class TokenRow:
    """The device a token hash names, whether it is the current or the replaced token."""

    user_id: int
    user_name: str
    device_pk: int
    device_id: str
    kind: int
    revoke_us: int | None
    is_current: bool
    # When the current token was issued (pairing, or the last rotation).
    issue_us: int
    # Until when the replaced token still works (None: there is none).
    prev_token_expire_us: int | None


@dataclass(frozen=True, slots=True)
class NewDevice:
    device_id: str
    name: str
    kind: int
    token_hash: bytes


@dataclass(frozen=True, slots=True)
class PairedDevice:
    device_pk: int
    user_id: int
    user_name: str


class IdentityStorage(Protocol):
    async def add_user(self, name: str, now_us: int) -> int:
        """The new user's id; DuplicateKey if the name is taken."""
        ...

    async def user_id_by_name(self, name: str) -> int | None: ...

    async def list_users(self) -> list[UserRow]: ...

    async def add_pairing_code(
        self, code_hash: bytes, user_id: int, now_us: int, expire_us: int
    ) -> None:
        """Store a code (dropping codes expired before now_us in the same transaction)."""
        ...

    async def pairing_code(self, code_hash: bytes) -> PairingCodeRow | None:
        """A code as last committed, without taking the write path (for wrong guesses)."""
        ...

    async def redeem_pairing_code(
        self, code_hash: bytes, now_us: int, device: NewDevice
    ) -> PairedDevice | None:
        """In one transaction: if the code is unused and unexpired at now_us, mark it used and
        add the device; None (nothing written) otherwise."""
        ...

    async def token(self, token_hash: bytes) -> TokenRow | None:
        """The device whose current or replaced token has this hash."""
        ...

    async def rotate_token(
        self,
        device_pk: int,
        user_id: int,
        presented_hash: bytes,
        new_hash: bytes,
        now_us: int,
        grace_until_us: int,
    ) -> int | None:
        """In one transaction, replace the device's token by new_hash. Presented with the
        current token, that token becomes the replaced one until grace_until_us; presented with
        the replaced one, it keeps its own grace. Returns the replaced token's expiry, or None
        if the device is revoked or gone (nothing written)."""
        ...

    async def revoke_times(self, device_pks: list[int]) -> dict[int, int | None]:
        """revoke_us of each device that still exists (erased devices are absent)."""
        ...

    async def list_devices(self, user_id: int) -> list[DeviceRecord]: ...

    async def get_device(self, user_id: int, device_id: str) -> DeviceRecord | None: ...

    async def revoke_device(self, device_pk: int, user_id: int, now_us: int) -> None: ...

    async def touch_device(self, device_pk: int, now_us: int) -> None:
        """Record last_seen; StorageError if it cannot be written now."""
        ...

    async def shared_secret(self, name: str, fresh: bytes) -> bytes:
        """The server-wide secret stored under name, storing `fresh` first if there is none:
        every replica over the same database gets the one stored first (e.g. the page-token
        key, pulsesync.server.rpc.pagination)."""
        ...

"""PostgreSQL implementation of the identity storage seam (users, devices, pairing codes, tokens).

The same promises as on SQLite: a pairing code is redeemed once (its row is locked for the
redeeming transaction, so two replicas racing on one code cannot both pair), and a rotation
swaps the token hashes in one transaction under the device row's lock.
"""

from __future__ import annotations

from typing import Final

import asyncpg

from pulsesync.server.storage.errors import DuplicateKey, StorageError
from pulsesync.server.storage.identity import (
    DeviceRecord,
    NewDevice,
    PairedDevice,
    PairingCodeRow,
    TokenRow,
    UserRow,
)
from pulsesync.server.storage.postgres.pool import PostgresPool

_DEVICE_COLUMNS: Final = (
    "device_pk, device_id, user_id, name, kind, pair_us, last_seen_us, revoke_us, clock_offset_us"
)


def _opt(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _device(row: asyncpg.Record) -> DeviceRecord:
    return DeviceRecord(
        device_pk=int(row["device_pk"]),
        device_id=str(row["device_id"]),
        user_id=int(row["user_id"]),
        name=str(row["name"]),
        kind=int(row["kind"]),
        pair_us=int(row["pair_us"]),
        last_seen_us=_opt(row["last_seen_us"]),
        revoke_us=_opt(row["revoke_us"]),
        clock_offset_us=int(row["clock_offset_us"]),
    )


class PostgresIdentityStorage:
    def __init__(self, pool: PostgresPool) -> None:
        self._pool = pool

    async def add_user(self, name: str, now_us: int) -> int:
        try:
            user_id = await self._pool.fetchval(
                "INSERT INTO users (name, create_us) VALUES ($1, $2) RETURNING user_id",
                name,
                now_us,
            )
        except asyncpg.UniqueViolationError:
            raise DuplicateKey(f"user name {name!r}") from None
        return int(user_id)

    async def user_id_by_name(self, name: str) -> int | None:
        return _opt(await self._pool.fetchval("SELECT user_id FROM users WHERE name = $1", name))

    async def list_users(self) -> list[UserRow]:
        rows = await self._pool.fetch("SELECT user_id, name, create_us FROM users ORDER BY user_id")
        return [UserRow(int(r[0]), str(r[1]), int(r[2])) for r in rows]

    async def add_pairing_code(
        self, code_hash: bytes, user_id: int, now_us: int, expire_us: int
    ) -> None:
        async with self._pool.transaction() as conn:
            # Expired codes are useless; drop them while we are here.
            await conn.execute("DELETE FROM pairing_codes WHERE expire_us < $1", now_us)
            await conn.execute(
                "INSERT INTO pairing_codes (code_hash, user_id, create_us, expire_us)"
                " VALUES ($1, $2, $3, $4)",
                code_hash,
                user_id,
                now_us,
                expire_us,
            )

    async def pairing_code(self, code_hash: bytes) -> PairingCodeRow | None:
        rows = await self._pool.fetch(
            "SELECT user_id, expire_us, used_us FROM pairing_codes WHERE code_hash = $1",
            code_hash,
        )
        if not rows:
            return None
        row = rows[0]
        return PairingCodeRow(int(row[0]), int(row[1]), _opt(row[2]))

    async def redeem_pairing_code(
        self, code_hash: bytes, now_us: int, device: NewDevice
    ) -> PairedDevice | None:
        async with self._pool.transaction() as conn:
            # FOR UPDATE: a second redeemer (on this or another replica) waits for this
            # transaction, then sees the code used.
            row = await conn.fetchrow(
                "SELECT user_id, expire_us, used_us FROM pairing_codes WHERE code_hash = $1"
                " FOR UPDATE",
                code_hash,
            )
            if row is None or row[2] is not None or row[1] < now_us:
                return None
            user_id = int(row[0])
            await conn.execute(
                "UPDATE pairing_codes SET used_us = $1 WHERE user_id = $2 AND code_hash = $3",
                now_us,
                user_id,
                code_hash,
            )
            device_pk = await conn.fetchval(
                "INSERT INTO devices (device_id, user_id, name, kind, token_hash, pair_us)"
                " VALUES ($1, $2, $3, $4, $5, $6) RETURNING device_pk",
                device.device_id,
                user_id,
                device.name,
                device.kind,
                device.token_hash,
                now_us,
            )
            user_name = await conn.fetchval("SELECT name FROM users WHERE user_id = $1", user_id)
        assert user_name is not None
        return PairedDevice(int(device_pk), user_id, str(user_name))

    async def token(self, token_hash: bytes) -> TokenRow | None:
        rows = await self._pool.fetch(
            "SELECT d.user_id, u.name, d.device_pk, d.device_id, d.kind, d.revoke_us,"
            " d.token_hash = $1, coalesce(d.token_issue_us, d.pair_us), d.prev_token_expire_us"
            " FROM devices d JOIN users u USING (user_id)"
            " WHERE d.token_hash = $1 OR d.prev_token_hash = $1",
            token_hash,
        )
        if not rows:
            return None
        row = rows[0]
        return TokenRow(
            user_id=int(row[0]),
            user_name=str(row[1]),
            device_pk=int(row[2]),
            device_id=str(row[3]),
            kind=int(row[4]),
            revoke_us=_opt(row[5]),
            is_current=bool(row[6]),
            issue_us=int(row[7]),
            prev_token_expire_us=_opt(row[8]),
        )

    async def rotate_token(
        self,
        device_pk: int,
        user_id: int,
        presented_hash: bytes,
        new_hash: bytes,
        now_us: int,
        grace_until_us: int,
    ) -> int | None:
        async with self._pool.transaction() as conn:
            row = await conn.fetchrow(
                "SELECT token_hash = $1, prev_token_expire_us FROM devices"
                " WHERE user_id = $2 AND device_pk = $3 AND revoke_us IS NULL FOR UPDATE",
                presented_hash,
                user_id,
                device_pk,
            )
            if row is None:
                return None
            if row[0]:
                await conn.execute(
                    "UPDATE devices SET prev_token_hash = token_hash, prev_token_expire_us = $1,"
                    " token_hash = $2, token_issue_us = $3 WHERE user_id = $4 AND device_pk = $5",
                    grace_until_us,
                    new_hash,
                    now_us,
                    user_id,
                    device_pk,
                )
                return grace_until_us
            # Presented with the previous token, still in its grace period.
            await conn.execute(
                "UPDATE devices SET token_hash = $1, token_issue_us = $2"
                " WHERE user_id = $3 AND device_pk = $4",
                new_hash,
                now_us,
                user_id,
                device_pk,
            )
            return int(row[1])

    async def revoke_times(self, device_pks: list[int]) -> dict[int, int | None]:
        if not device_pks:
            return {}
        rows = await self._pool.fetch(
            "SELECT device_pk, revoke_us FROM devices WHERE device_pk = ANY($1::bigint[])",
            device_pks,
        )
        return {int(r[0]): _opt(r[1]) for r in rows}

    async def list_devices(self, user_id: int) -> list[DeviceRecord]:
        rows = await self._pool.fetch(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user_id = $1 ORDER BY device_pk",
            user_id,
        )
        return [_device(r) for r in rows]

    async def get_device(self, user_id: int, device_id: str) -> DeviceRecord | None:
        rows = await self._pool.fetch(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user_id = $1 AND device_id = $2",
            user_id,
            device_id,
        )
        return _device(rows[0]) if rows else None

    async def revoke_device(self, device_pk: int, user_id: int, now_us: int) -> None:
        await self._pool.execute(
            "UPDATE devices SET revoke_us = $1 WHERE user_id = $2 AND device_pk = $3",
            now_us,
            user_id,
            device_pk,
        )

    async def touch_device(self, device_pk: int, now_us: int) -> None:
        try:
            await self._pool.execute(
                "UPDATE devices SET last_seen_us = $1 WHERE device_pk = $2", now_us, device_pk
            )
        except (asyncpg.PostgresError, OSError) as e:
            raise StorageError(f"{type(e).__name__}: {e}") from e

    async def shared_secret(self, name: str, fresh: bytes) -> bytes:
        async with self._pool.transaction() as conn:
            # Replicas starting together: the second insert waits for the first to commit and
            # does nothing; the select (a new snapshot) then reads the first one's secret.
            await conn.execute(
                "INSERT INTO server_secrets (name, secret) VALUES ($1, $2)"
                " ON CONFLICT (name) DO NOTHING",
                name,
                fresh,
            )
            secret = await conn.fetchval("SELECT secret FROM server_secrets WHERE name = $1", name)
        return bytes(secret)

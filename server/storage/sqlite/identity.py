"""SQLite implementation of the identity storage seam (users, devices, pairing codes, tokens)."""

from __future__ import annotations

import sqlite3
from typing import Final

from pulsesync.server.storage.db import Database
from pulsesync.server.storage.errors import DuplicateKey, StorageError
from pulsesync.server.storage.identity import (
    DeviceRecord,
    NewDevice,
    PairedDevice,
    PairingCodeRow,
    TokenRow,
    UserRow,
)

_DEVICE_COLUMNS: Final = (
    "device_pk, device_id, user_id, name, kind, pair_us, last_seen_us, revoke_us, clock_offset_us"
)


def _device(row: sqlite3.Row) -> DeviceRecord:
    # The columns are selected in the record's field order.
    return DeviceRecord(*row)


class SqliteIdentityStorage:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def add_user(self, name: str, now_us: int) -> int:
        try:
            async with self._db.transaction() as tx:
                cur = await tx.execute(
                    "INSERT INTO users (name, create_us) VALUES (?, ?)", (name, now_us)
                )
                user_id = cur.lastrowid
        except sqlite3.IntegrityError:
            raise DuplicateKey(f"user name {name!r}") from None
        assert user_id is not None
        return user_id

    async def user_id_by_name(self, name: str) -> int | None:
        async with self._db.reader.execute(
            "SELECT user_id FROM users WHERE name = ?", (name,)
        ) as c:
            row = await c.fetchone()
        return None if row is None else int(row[0])

    async def list_users(self) -> list[UserRow]:
        async with self._db.reader.execute(
            "SELECT user_id, name, create_us FROM users ORDER BY user_id"
        ) as c:
            return [UserRow(int(r[0]), str(r[1]), int(r[2])) for r in await c.fetchall()]

    async def add_pairing_code(
        self, code_hash: bytes, user_id: int, now_us: int, expire_us: int
    ) -> None:
        async with self._db.transaction() as tx:
            # Expired codes are useless; drop them while we are here.
            await tx.execute("DELETE FROM pairing_codes WHERE expire_us < ?", (now_us,))
            await tx.execute(
                "INSERT INTO pairing_codes (code_hash, user_id, create_us, expire_us)"
                " VALUES (?, ?, ?, ?)",
                (code_hash, user_id, now_us, expire_us),
            )

    async def pairing_code(self, code_hash: bytes) -> PairingCodeRow | None:
        async with self._db.reader.execute(
            "SELECT user_id, expire_us, used_us FROM pairing_codes WHERE code_hash = ?",
            (code_hash,),
        ) as c:
            row = await c.fetchone()
        if row is None:
            return None
        return PairingCodeRow(int(row[0]), int(row[1]), None if row[2] is None else int(row[2]))

    async def redeem_pairing_code(
        self, code_hash: bytes, now_us: int, device: NewDevice
    ) -> PairedDevice | None:
        async with self._db.transaction() as tx:
            async with tx.execute(
                "SELECT user_id, expire_us, used_us FROM pairing_codes WHERE code_hash = ?",
                (code_hash,),
            ) as c:
                row = await c.fetchone()
            if row is None or row[2] is not None or row[1] < now_us:
                return None
            user_id = int(row[0])
            await tx.execute(
                "UPDATE pairing_codes SET used_us = ? WHERE code_hash = ?", (now_us, code_hash)
            )
            cur = await tx.execute(
                "INSERT INTO devices (device_id, user_id, name, kind, token_hash, pair_us)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (device.device_id, user_id, device.name, device.kind, device.token_hash, now_us),
            )
            device_pk = cur.lastrowid
            async with tx.execute("SELECT name FROM users WHERE user_id = ?", (user_id,)) as c:
                user_row = await c.fetchone()
        assert device_pk is not None
        assert user_row is not None
        return PairedDevice(device_pk, user_id, str(user_row[0]))

    async def token(self, token_hash: bytes) -> TokenRow | None:
        async with self._db.reader.execute(
            "SELECT d.user_id, u.name, d.device_pk, d.device_id, d.kind, d.revoke_us,"
            " d.token_hash = ?, coalesce(d.token_issue_us, d.pair_us), d.prev_token_expire_us"
            " FROM devices d JOIN users u USING (user_id)"
            " WHERE d.token_hash = ? OR d.prev_token_hash = ?",
            (token_hash, token_hash, token_hash),
        ) as c:
            row = await c.fetchone()
        if row is None:
            return None
        return TokenRow(
            user_id=int(row[0]),
            user_name=str(row[1]),
            device_pk=int(row[2]),
            device_id=str(row[3]),
            kind=int(row[4]),
            revoke_us=None if row[5] is None else int(row[5]),
            is_current=bool(row[6]),
            issue_us=int(row[7]),
            prev_token_expire_us=None if row[8] is None else int(row[8]),
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
        async with self._db.transaction() as tx:
            async with tx.execute(
                "SELECT token_hash = ?, prev_token_expire_us FROM devices"
                " WHERE device_pk = ? AND user_id = ? AND revoke_us IS NULL",
                (presented_hash, device_pk, user_id),
            ) as c:
                row = await c.fetchone()
            if row is None:
                return None
            if row[0]:
                await tx.execute(
                    "UPDATE devices SET prev_token_hash = token_hash, prev_token_expire_us = ?,"
                    " token_hash = ?, token_issue_us = ? WHERE device_pk = ?",
                    (grace_until_us, new_hash, now_us, device_pk),
                )
                return grace_until_us
            # Presented with the previous token, still in its grace period.
            await tx.execute(
                "UPDATE devices SET token_hash = ?, token_issue_us = ? WHERE device_pk = ?",
                (new_hash, now_us, device_pk),
            )
            return int(row[1])

    async def revoke_times(self, device_pks: list[int]) -> dict[int, int | None]:
        if not device_pks:
            return {}
        marks = ",".join("?" * len(device_pks))
        async with self._db.reader.execute(
            f"SELECT device_pk, revoke_us FROM devices WHERE device_pk IN ({marks})",
            device_pks,
        ) as c:
            return {int(r[0]): None if r[1] is None else int(r[1]) for r in await c.fetchall()}

    async def list_devices(self, user_id: int) -> list[DeviceRecord]:
        async with self._db.reader.execute(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user_id = ? ORDER BY device_pk",
            (user_id,),
        ) as c:
            return [_device(row) for row in await c.fetchall()]

    async def get_device(self, user_id: int, device_id: str) -> DeviceRecord | None:
        async with self._db.reader.execute(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user_id = ? AND device_id = ?",
            (user_id, device_id),
        ) as c:
            row = await c.fetchone()
        return None if row is None else _device(row)

    async def revoke_device(self, device_pk: int, user_id: int, now_us: int) -> None:
        async with self._db.transaction() as tx:
            await tx.execute(
                "UPDATE devices SET revoke_us = ? WHERE device_pk = ? AND user_id = ?",
                (now_us, device_pk, user_id),
            )

    async def touch_device(self, device_pk: int, now_us: int) -> None:
        try:
            async with self._db.transaction() as tx:
                await tx.execute(
                    "UPDATE devices SET last_seen_us = ? WHERE device_pk = ?", (now_us, device_pk)
                )
        except sqlite3.Error as e:
            raise StorageError(str(e)) from e

    async def shared_secret(self, name: str, fresh: bytes) -> bytes:
        async with self._db.transaction() as tx:
            await tx.execute(
                "INSERT OR IGNORE INTO server_secrets (name, secret) VALUES (?, ?)", (name, fresh)
            )
            async with tx.execute(
                "SELECT secret FROM server_secrets WHERE name = ?", (name,)
            ) as cur:
                row = await cur.fetchone()
        assert row is not None
        return bytes(row[0])

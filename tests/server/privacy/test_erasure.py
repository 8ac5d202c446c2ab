from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from pulsesync.server.app import RunningServer
from pulsesync.server.privacy.audit import AuditLog
from pulsesync.server.privacy.erasure import DeletionReceipt, verify_receipt
from pulsesync.server.rpc.privacy import PrivacyServicer
from pulsesync.server.storage.sqlite.privacy import scrub_file, user_tables
from pulsesync.status import error_info
from pulsesync.v1 import common_pb2, devices_pb2, devices_pb2_grpc, privacy_pb2, privacy_pb2_grpc
from tests.server.privacy.support import (
    database_bytes,
    heart_rate,
    quarantine,
    search,
    store_events,
    user_id,
)
from tests.support.server import pair_device

T0 = 1_767_225_600_000_000
NAME = "zelda-quintessa"
QUERY = "zelda-secret-query"
SENSOR = "ZZ:EL:DA:42"


def privacy(server: RunningServer) -> PrivacyServicer:
    servicer = server.servicers["pulsesync.v1.PrivacyService"]
    assert isinstance(servicer, PrivacyServicer)
    return servicer


async def counts_of(server: RunningServer, uid: int) -> dict[str, int]:
    out = {}
    for t in await user_tables(server.app.db.reader):
        async with server.app.db.reader.execute(
            f'SELECT COUNT(*) FROM "{t.name}" WHERE user_id = ?', (uid,)
        ) as c:
            row = await c.fetchone()
        assert row is not None
        out[t.name] = int(row[0])
    return out


def receipt_of(msg: privacy_pb2.DeletionReceipt) -> DeletionReceipt:
    return DeletionReceipt(
        msg.receipt_id,
        msg.erase_time.seconds * 1_000_000 + msg.erase_time.nanos // 1000,
        dict(msg.deleted_counts),
        msg.subject_salt,
        msg.subject_hash,
        msg.signature,
    )


async def test_erase_leaves_no_byte_of_the_person_and_keeps_others(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    phone = await pair_device(server, NAME, name="zelda-phone-xyz")
    strap = await pair_device(server, NAME, kind=common_pb2.DEVICE_KIND_WEARABLE_BRIDGE)
    bo = await pair_device(server, "bo")
    await store_events(
        server,
        phone.device_id,
        [(T0 + i, search(f"{QUERY}-{i}", i + 1, T0)) for i in range(200)],
    )
    await store_events(
        server, strap.device_id, [(T0 + i, heart_rate(SENSOR, 70, i + 1, T0)) for i in range(500)]
    )
    await quarantine(
        server, phone.device_id, search(QUERY, 900, T0).SerializeToString(), 900, T0, "x"
    )
    await store_events(server, bo.device_id, [(T0, search("bo-keep-me", 1, T0))])
    ada_id = await user_id(server, NAME)
    bo_id = await user_id(server, "bo")
    await server.app.identity.create_pairing_code(ada_id)
    bo_before = await counts_of(server, bo_id)
    hooked: list[int] = []

    async def hook(uid: int) -> None:
        hooked.append(uid)

    server.app.user_data.on_erase("test", hook)
    identifiers = [NAME, phone.device_id, strap.device_id, "zelda-phone-xyz", QUERY, SENSOR]
    before = database_bytes(server.app.db.path)
    assert all(s.encode() in before for s in identifiers), "the scan must be able to fail"

    stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
    watch = stub.WatchConsents(
        privacy_pb2.WatchConsentsRequest(), metadata=strap.metadata, timeout=10
    )
    await watch.read()

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.EraseData(privacy_pb2.EraseDataRequest(), metadata=phone.metadata, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(err.value)
    assert info is not None
    assert info.reason == "CONFIRMATION_REQUIRED"

    resp = await stub.EraseData(
        privacy_pb2.EraseDataRequest(confirmation="ERASE"), metadata=phone.metadata, timeout=30
    )
    receipt = receipt_of(resp.receipt)
    assert verify_receipt(privacy(server).center.key, receipt)
    tampered = DeletionReceipt(
        receipt.receipt_id, receipt.erase_us, {**receipt.deleted_counts, "events": 1},
        receipt.subject_salt, receipt.subject_hash, receipt.signature,
    )  # fmt: skip
    assert not verify_receipt(privacy(server).center.key, tampered)
    assert receipt.deleted_counts["events"] == 700
    assert receipt.deleted_counts["devices"] == 2
    assert receipt.deleted_counts["users"] == 1
    assert receipt.deleted_counts["quarantine"] == 1
    assert receipt.deleted_counts["pairing_codes"] == 3  # two used for pairing, one spare
    assert (
        receipt.subject_hash
        == hashlib.sha256(bytes.fromhex(receipt.subject_salt) + NAME.encode()).hexdigest()
    )
    wire = resp.SerializeToString()
    assert all(s.encode() not in wire for s in identifiers)
    assert hooked == [ada_id]

    # the open stream was cut off, and the tokens are dead
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(watch.read(), 5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(err.value)
    assert info is not None
    assert info.reason == "USER_ERASED"
    devices = devices_pb2_grpc.DeviceServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await devices.ListDevices(
            devices_pb2.ListDevicesRequest(), metadata=strap.metadata, timeout=5
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # no byte of the person in the database file, its WAL or shared memory
    after = database_bytes(server.app.db.path)
    leaked = [s for s in identifiers if s.encode() in after]
    assert leaked == []
    assert all(n == 0 for n in (await counts_of(server, ada_id)).values())

    # the other person is untouched and keeps working
    assert await counts_of(server, bo_id) == bo_before
    assert b"bo-keep-me" in after
    listed = await devices.ListDevices(
        devices_pb2.ListDevicesRequest(), metadata=bo.metadata, timeout=5
    )
    assert [d.device_id for d in listed.devices] == [bo.device_id]

    # the erasure is audited without identifiers, and the receipt is kept
    entries = await AuditLog(server.app.storage.privacy, server.app.clock).entries(action="erase")
    assert entries[0].actor == "device"
    assert entries[0].detail["receipt_id"] == receipt.receipt_id
    assert all(s not in json.dumps(entries[0].detail) + entries[0].subject for s in identifiers)
    async with server.app.db.reader.execute(
        "SELECT signature FROM deletion_receipts WHERE receipt_id = ?", (receipt.receipt_id,)
    ) as c:
        assert await c.fetchone() == (receipt.signature,)


async def test_erasing_an_unknown_person_is_not_found(server: RunningServer) -> None:
    from pulsesync.server.errors import NotFound
    from pulsesync.server.privacy.audit import Actor

    with pytest.raises(NotFound):
        await privacy(server).center.erase(12345, Actor.ADMIN)


async def test_scrub_reports_a_smaller_file(server: RunningServer) -> None:
    phone = await pair_device(server, "ada")
    await store_events(
        server, phone.device_id, [(T0 + i, search("x" * 200, i + 1, T0)) for i in range(2000)]
    )
    async with server.app.db.transaction() as tx:
        await tx.execute("DELETE FROM events")
    report = await asyncio.to_thread(scrub_file, server.app.db.path)
    assert not report.checkpoint_busy
    assert report.db_bytes_after < report.db_bytes_before
    assert not server.app.db.path.with_name(server.app.db.path.name + "-wal").stat().st_size


async def test_erasure_shreds_the_profile_key_so_a_database_backup_cannot_open_it(
    server: RunningServer, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    from pulsesync.server.compose import open_profile_store
    from pulsesync.server.profiles.crypto import ProfileIntegrityError
    from pulsesync.server.storage.db import Database
    from pulsesync.server.storage.sqlite.keys import vault_bytes

    phone = await pair_device(server, NAME)
    await pair_device(server, "bo")
    ada_id, bo_id = await user_id(server, NAME), await user_id(server, "bo")
    for uid, value in ((ada_id, "zelda-profile-secret"), (bo_id, "bo-profile")):

        def set_note(p: Any, v: str = value) -> None:
            p.preferences.app_settings["note"] = v

        await server.app.profiles.edit(uid, set_note)
    vault = server.app.profiles.keys.vault
    assert isinstance(vault.path, Path)  # the SQLite vault file, whose bytes are scanned
    ada_key = await vault.get(ada_id)
    assert ada_key is not None
    # The database holds ciphertext only: no wrapped key in it, so none in its backups.
    assert ada_key.wrapped.blob not in database_bytes(server.app.db.path)
    assert ada_key.wrapped.blob in vault_bytes(vault.path)
    backup = tmp_path / "backup" / "pulsesync.db"
    backup.parent.mkdir()
    with sqlite3.connect(server.app.db.path) as live, sqlite3.connect(backup) as copy:
        live.backup(copy)
    live.close()
    copy.close()

    stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
    resp = await stub.EraseData(
        privacy_pb2.EraseDataRequest(confirmation="ERASE"), metadata=phone.metadata, timeout=30
    )
    assert resp.receipt.deleted_counts["profile_versions"] == 1
    assert "profile_keys" not in resp.receipt.deleted_counts
    # The erase hook destroyed the key: not in the vault, its log or the database.
    assert await vault.get(ada_id) is None
    assert ada_key.wrapped.blob not in vault_bytes(vault.path)
    assert ada_key.wrapped.blob not in database_bytes(server.app.db.path)

    # The backup from before the erasure, opened with the live key file and vault: the
    # erased person's profile is there as ciphertext but cannot be decrypted; bo's can.
    config = replace(server.app.config, db_path=backup)
    async with await Database.open(backup) as db:
        store = await open_profile_store(config, db, server.app.clock)
        with pytest.raises(ProfileIntegrityError) as err:
            await store.get(ada_id)
        assert err.value.reason == "PROFILE_KEY_MISSING"
        assert (await store.get(bo_id)).preferences.app_settings["note"] == "bo-profile"
    assert b"zelda-profile-secret" not in database_bytes(backup)
    server.app.profiles.forget_caches()
    assert (await server.app.profiles.get(bo_id)).preferences.app_settings["note"] == "bo-profile"

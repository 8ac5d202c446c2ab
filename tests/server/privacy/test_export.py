from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from pulsesync.server.app import RunningServer
from pulsesync.server.privacy.audit import AuditLog
from pulsesync.server.privacy.export import (
    CHUNK_BYTES,
    encode_blob,
    read_archive,
    records,
    verify_archive,
    write_archive,
)
from pulsesync.server.storage.sqlite.privacy import user_tables
from pulsesync.v1 import common_pb2, events_pb2, privacy_pb2, privacy_pb2_grpc
from tests.server.privacy.support import (
    feature_use,
    heart_rate,
    quarantine,
    search,
    store_events,
    user_id,
)
from tests.support.server import PairedDevice, pair_device

T0 = 1_767_225_600_000_000


async def rpc_chunks(
    stub: privacy_pb2_grpc.PrivacyServiceStub, device: PairedDevice
) -> AsyncIterator[tuple[str, bytes]]:
    call: Any = stub.ExportData(
        privacy_pb2.ExportDataRequest(), metadata=device.metadata, timeout=30
    )
    async for msg in call:
        yield msg.file_name, msg.chunk


async def seed(server: RunningServer) -> tuple[PairedDevice, PairedDevice, PairedDevice]:
    phone = await pair_device(server, "ada")
    strap = await pair_device(server, "ada", kind=common_pb2.DEVICE_KIND_WEARABLE_BRIDGE)
    bo = await pair_device(server, "bo")
    await store_events(
        server,
        phone.device_id,
        [(T0 + i * 1_000_000, search(f"ada-query-{i}", i + 1, T0)) for i in range(3)]
        + [(T0 + 9_000_000, feature_use("flashcards", 4, T0))],
    )
    # enough heart-rate events that the file spans several chunks
    await store_events(
        server,
        strap.device_id,
        [(T0 + i * 1000, heart_rate("AA:BB", 60 + i % 40, i + 1, T0)) for i in range(1500)],
    )
    await store_events(server, bo.device_id, [(T0, search("bo-query", 1, T0))])
    await quarantine(server, phone.device_id, b"\xff\x00not-an-event", 99, T0, "unparseable body")
    await quarantine(
        server, phone.device_id, search("bad-time", 98, T0).SerializeToString(), 98, T0, "skew"
    )
    await server.app.identity.create_pairing_code(await user_id(server, "ada"))
    return phone, strap, bo


async def db_rows(server: RunningServer, table: str, uid: int) -> list[dict[str, Any]]:
    async with server.app.db.reader.execute(
        f'SELECT * FROM "{table}" WHERE user_id = ?', (uid,)
    ) as c:
        names = [d[0] for d in c.description]
        return [dict(zip(names, row, strict=True)) for row in await c.fetchall()]


def decode(table: str, column: str, value: Any) -> Any:
    """Undo the export's blob encoding."""
    if isinstance(value, dict):
        if set(value) == {"base64"}:
            return base64.b64decode(value["base64"])
        return json_format.ParseDict(value, events_pb2.Event()).SerializeToString()
    return value


async def test_export_round_trips_every_record_type(
    server: RunningServer, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    async def profile_exporter(uid: int) -> AsyncIterator[dict[str, Any]]:
        yield {"user_id": uid, "goals": {"steps": 9000}, "note": "decrypted by its component"}

    server.app.user_data.add_exporter("test_profile", profile_exporter)
    phone, _, _ = await seed(server)
    uid = await user_id(server, "ada")
    stub = privacy_pb2_grpc.PrivacyServiceStub(channel)

    names = await write_archive(rpc_chunks(stub, phone), tmp_path / "ada.zip")
    assert names[-1] == "manifest.json"
    members = read_archive(tmp_path / "ada.zip")
    manifest = verify_archive(members)
    by_name = {f["name"]: f for f in manifest["files"]}

    tables = await user_tables(server.app.db.reader)
    assert {"users", "devices", "events", "quarantine", "consent_ledger", "pairing_codes"} <= {
        t.name for t in tables
    }
    for table in tables:
        exported = records(members, table.name)
        stored = await db_rows(server, table.name, uid)
        assert by_name[f"{table.name}.jsonl"]["count"] == len(stored) == len(exported), table.name
        omitted = set(table.omitted_columns)
        assert set(by_name[f"{table.name}.jsonl"]["omitted_columns"]) == omitted
        for got, want in zip(exported, stored, strict=True):
            assert not omitted & set(got), "secret columns must not be exported"
            restored = {k: decode(table.name, k, v) for k, v in got.items()}
            assert restored == {k: v for k, v in want.items() if k not in omitted}, table.name

    assert records(members, "test_profile") == [
        {"user_id": uid, "goals": {"steps": 9000}, "note": "decrypted by its component"}
    ]
    assert by_name["test_profile.jsonl"]["source"] == "component"
    # decoded events are readable JSON, the unparseable quarantined body is base64
    events = records(members, "events")
    assert events[0]["body"]["search"]["query"] == "ada-query-0"
    q = records(members, "quarantine")
    assert {"base64"} in [set(r["body"]) for r in q]
    assert "search" in [
        next(iter(set(r["body"]) - {"event_id", "seq", "device_time"}))
        for r in q
        if "base64" not in r["body"]
    ]
    # nothing of the other person, and the big file really was streamed in several chunks
    blob = b"".join(members.values())
    assert b"bo-query" not in blob
    assert by_name["events.jsonl"]["bytes"] > CHUNK_BYTES
    assert (await AuditLog(server.app.storage.privacy, server.app.clock).entries())[
        0
    ].action == "export"


async def test_export_to_a_directory_verifies_and_detects_tampering(
    server: RunningServer, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    phone, _, _ = await seed(server)
    stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
    await write_archive(rpc_chunks(stub, phone), tmp_path / "out")
    members = read_archive(tmp_path / "out")
    verify_archive(members)
    members["events.jsonl"] = members["events.jsonl"].replace(b"ada-query-1", b"ada-query-X")
    with pytest.raises(ValueError, match="checksum"):
        verify_archive(members)


def test_blob_encoding_is_lossless() -> None:
    event = search("q", 1, T0)
    raw = event.SerializeToString()
    as_json = encode_blob("events", "body", raw)
    assert json_format.ParseDict(as_json, events_pb2.Event()) == event
    assert encode_blob("events", "body", b"\xff\xfe") == {"base64": "//4="}
    assert encode_blob("other", "body", raw) == {"base64": base64.b64encode(raw).decode()}
    json.dumps(as_json)


async def test_the_profile_is_exported_decrypted_and_key_material_never(
    server: RunningServer, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    phone = await pair_device(server, "ada")
    uid = await user_id(server, "ada")
    await server.app.profiles.edit(
        uid, lambda p: p.preferences.app_settings.__setitem__("reader.font", "serif-large")
    )
    stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
    await write_archive(rpc_chunks(stub, phone), tmp_path / "ada.zip")
    members = read_archive(tmp_path / "ada.zip")
    manifest = verify_archive(members)
    [profile] = records(members, "profile")
    assert profile["preferences"]["app_settings"] == {"reader.font": "serif-large"}
    by_name = {f["name"]: f for f in manifest["files"]}
    assert {"nonce", "ciphertext"} <= set(by_name["profile_versions.jsonl"]["omitted_columns"])
    # Data keys live in the key vault, which export never reads: no record type for them,
    # and neither the wrapped key nor the data key itself appears anywhere in the archive.
    assert not any(
        "key" in name.removesuffix(".jsonl") for name in by_name if name != "manifest.json"
    )
    vault = server.app.profiles.keys.vault
    assert vault is not None
    stored = await vault.get(uid)
    assert stored is not None
    data_key = server.app.profiles.keys.cache[uid].key
    archive = b"".join(members.values())
    for secret in (stored.wrapped.blob, data_key):
        assert secret not in archive
        assert base64.b64encode(secret) not in archive
        assert secret.hex().encode() not in archive


def test_a_body_json_cannot_carry_is_exported_as_its_bytes() -> None:
    event = search("q", 1, T0)
    event.device_time.seconds = 253_402_300_800  # year 10000: no JSON form exists
    raw = event.SerializeToString()
    assert encode_blob("quarantine", "body", raw) == {"base64": base64.b64encode(raw).decode()}


async def test_export_succeeds_with_a_quarantined_event_of_an_extreme_time(
    server: RunningServer, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    phone, _, _ = await seed(server)
    extreme = search("far-future", 97, T0)
    extreme.device_time.seconds = 253_402_300_800
    await quarantine(server, phone.device_id, extreme.SerializeToString(), 97, T0, "too late")
    stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
    await write_archive(rpc_chunks(stub, phone), tmp_path / "out")
    members = read_archive(tmp_path / "out")
    verify_archive(members)
    bodies = [r["body"] for r in records(members, "quarantine")]
    assert {"base64": base64.b64encode(extreme.SerializeToString()).decode()} in bodies

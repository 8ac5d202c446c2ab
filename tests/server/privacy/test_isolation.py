"""A device acts only for its own person: no privacy request can name another user."""

from __future__ import annotations

from pathlib import Path

import grpc

from pulsesync.server.app import RunningServer
from pulsesync.server.privacy.export import read_archive, records, write_archive
from pulsesync.v1 import common_pb2, privacy_pb2, privacy_pb2_grpc
from tests.server.privacy.support import search, store_events, user_id
from tests.server.privacy.test_export import rpc_chunks
from tests.support.server import pair_device

T0 = 1_767_225_600_000_000


def test_no_privacy_request_carries_a_user() -> None:
    service = privacy_pb2.DESCRIPTOR.services_by_name["PrivacyService"]
    for method in service.methods:
        fields = {f.name for f in method.input_type.fields}
        assert not {f for f in fields if "user" in f or "device" in f}, method.name


async def test_a_device_reads_changes_exports_and_erases_only_its_own_person(
    server: RunningServer, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    a = await pair_device(server, "ada", consents=(common_pb2.CONSENT_CATEGORY_BEHAVIOR,))
    b = await pair_device(server, "bo", consents=(common_pb2.CONSENT_CATEGORY_ACTIVITY,))
    await store_events(server, a.device_id, [(T0, search("ada-only", 1, T0))])
    await store_events(server, b.device_id, [(T0, search("bo-only", 1, T0))])
    a_id, b_id = await user_id(server, "ada"), await user_id(server, "bo")
    stub = privacy_pb2_grpc.PrivacyServiceStub(channel)

    seen = await stub.GetConsents(privacy_pb2.GetConsentsRequest(), metadata=a.metadata, timeout=5)
    assert {c.category for c in seen.consents if c.granted} == {
        common_pb2.CONSENT_CATEGORY_BEHAVIOR
    }

    await stub.UpdateConsent(
        privacy_pb2.UpdateConsentRequest(category=common_pb2.CONSENT_CATEGORY_SYNC, granted=True),
        metadata=a.metadata,
        timeout=5,
    )
    assert common_pb2.CONSENT_CATEGORY_SYNC in await server.app.consent.granted(a_id)
    assert await server.app.consent.granted(b_id) == {common_pb2.CONSENT_CATEGORY_ACTIVITY}

    summary = await stub.GetPrivacySummary(
        privacy_pb2.GetPrivacySummaryRequest(), metadata=a.metadata, timeout=5
    )
    assert summary.device_count == 1
    assert summary.record_counts["events"] == 1

    await write_archive(rpc_chunks(stub, a), tmp_path / "a")
    members = read_archive(tmp_path / "a")
    assert [u["name"] for u in records(members, "users")] == ["ada"]
    assert b"bo-only" not in b"".join(members.values())

    await stub.EraseData(
        privacy_pb2.EraseDataRequest(confirmation="ERASE"), metadata=a.metadata, timeout=30
    )
    assert [name for _, name, _ in await server.app.identity.list_users()] == ["bo"]
    still = await stub.GetPrivacySummary(
        privacy_pb2.GetPrivacySummaryRequest(), metadata=b.metadata, timeout=5
    )
    assert still.record_counts["events"] == 1
    assert still.record_counts["consent_ledger"] == 1

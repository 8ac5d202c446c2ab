"""The privacy summary counts, per category, exactly what the export hands over."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from pulsesync.server.app import RunningServer
from pulsesync.server.privacy.export import records
from pulsesync.v1 import (
    common_pb2,
    events_pb2,
    privacy_pb2,
    privacy_pb2_grpc,
    profiles_pb2,
    profiles_pb2_grpc,
)
from tests.server.privacy.support import (
    device_pk,
    feature_use,
    heart_rate,
    search,
    store_events,
    user_id,
)
from tests.support.server import pair_device

T0 = 1_767_225_600_000_000
BEHAVIOR = common_pb2.CONSENT_CATEGORY_BEHAVIOR
ACTIVITY = common_pb2.CONSENT_CATEGORY_ACTIVITY
PERSONALIZATION = common_pb2.CONSENT_CATEGORY_PERSONALIZATION
SYNC = common_pb2.CONSENT_CATEGORY_SYNC
# The export's events carry their payload by name; the category each payload belongs to.
CATEGORY_OF_PAYLOAD = {
    "search": BEHAVIOR,
    "feature_use": BEHAVIOR,
    "heart_rate": ACTIVITY,
    "nudge_interaction": PERSONALIZATION,
}
# The export's record types held for a category besides events (written out independently of
# the server's own table: the test would notice the server forgetting one).
TABLES_OF_CATEGORY = {
    PERSONALIZATION: ("nudge_decisions", "nudges", "nudge_feedback"),
    SYNC: ("profile_versions", "profile_feature_usage"),
}


def interaction(nudge_id: str, seq: int, t_us: int) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=str(uuid.uuid4()),
        seq=seq,
        device_time=timestamp_pb2.Timestamp(seconds=t_us // 1_000_000),
        nudge_interaction=events_pb2.NudgeInteraction(
            nudge_id=nudge_id, action=events_pb2.NUDGE_ACTION_DISMISSED
        ),
    )


async def seed_nudges(server: RunningServer, uid: int, pk: int) -> None:
    """Two decisions, one nudge sent to the phone, two feedback rows (as the engine writes)."""
    async with server.app.db.transaction() as tx:
        for i in range(2):
            await tx.execute(
                "INSERT INTO nudge_decisions (decision_id, user_id, decision_us, trigger,"
                " policy_version, features, options, ineligible, chosen, probability, predicted,"
                " nudge_id) VALUES (?, ?, ?, 'schedule', 'randomized', '{}', '{}', '{}', ?,"
                " 0.5, '{}', ?)",
                (100 + i, uid, T0 + i, "walk" if i else "none", "n1" if i else None),
            )
        await tx.execute(
            "INSERT INTO nudges (nudge_id, user_id, decision_id, nudge_type, device_pk, title,"
            " message, data, probability, reasons, create_us, expire_us, deliver_us, state,"
            " outcome_metric) VALUES ('n1', ?, 101, 'walk', ?, 't', 'm', '{}', 0.5, '[]', ?, ?,"
            " ?, 'delivered', 'steps')",
            (uid, pk, T0 + 1, T0 + 10, T0 + 2),
        )
        for action, t in ((1, T0 + 3), (2, T0 + 20_000_000)):
            await tx.execute(
                "INSERT INTO nudge_feedback (user_id, nudge_id, device_pk, action, action_us,"
                " received_us) VALUES (?, 'n1', ?, ?, ?, ?)",
                (uid, pk, action, t, t),
            )


async def test_summary_counts_equal_the_export_per_category(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    phone = await pair_device(server, "ada")
    strap = await pair_device(server, "ada", kind=common_pb2.DEVICE_KIND_WEARABLE_BRIDGE)
    bo = await pair_device(server, "bo")
    uid = await user_id(server, "ada")
    await store_events(
        server,
        phone.device_id,
        [
            (T0 + 1_000_000, search("q", 1, T0)),
            (T0 + 2_000_000, feature_use("cards", 2, T0)),
            (T0 + 3_000_000, interaction("n1", 3, T0)),
        ],
    )
    await store_events(
        server,
        strap.device_id,
        [(T0 + i * 1_000_000, heart_rate("s", 60, i + 1, T0)) for i in range(4)],
    )
    await store_events(server, bo.device_id, [(T0, search("bo", 1, T0))])
    await seed_nudges(server, uid, await device_pk(server, phone.device_id))
    profiles = profiles_pb2_grpc.ProfileServiceStub(channel)
    wall_ms = time.time_ns() // 1_000_000
    for version in range(2):
        req = profiles_pb2.UpdateProfileRequest(base_version=version)
        req.profile.goals.daily_steps = 8000 + version
        req.edits.add(
            field_path="goals.daily_steps",
            stamp=profiles_pb2.HybridTimestamp(
                wall_time_ms=wall_ms, logical=version, node_id=phone.device_id
            ),
        )
        resp = await profiles.UpdateProfile(req, metadata=phone.metadata, timeout=10)
        assert resp.committed

    stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
    summary = await stub.GetPrivacySummary(
        privacy_pb2.GetPrivacySummaryRequest(), metadata=phone.metadata, timeout=10
    )
    members: dict[str, bytearray] = {}
    call: Any = stub.ExportData(
        privacy_pb2.ExportDataRequest(), metadata=phone.metadata, timeout=30
    )
    async for msg in call:
        members.setdefault(msg.file_name, bytearray()).extend(msg.chunk)
    archive = {name: bytes(data) for name, data in members.items()}

    exported: Counter[int] = Counter()
    for event in records(archive, "events"):
        payload = next(k for k in CATEGORY_OF_PAYLOAD if k in event["body"])
        exported[CATEGORY_OF_PAYLOAD[payload]] += 1
    for category, tables in TABLES_OF_CATEGORY.items():
        exported[category] += sum(len(records(archive, t)) for t in tables)
    held = {c.category: c.record_count for c in summary.categories}
    assert held == {c: exported[c] for c in (BEHAVIOR, ACTIVITY, PERSONALIZATION, SYNC)}
    # Concretely: 2 app events; 4 heart rates; 1 interaction + 2 decisions + 1 nudge + 2
    # feedback rows; 2 profile versions (nothing of bo's).
    assert held == {BEHAVIOR: 2, ACTIVITY: 4, PERSONALIZATION: 6, SYNC: 2}

    cats = {c.category: c for c in summary.categories}
    personal = cats[PERSONALIZATION]
    assert personal.first_time.ToMicroseconds() == T0
    assert personal.last_time.ToMicroseconds() == T0 + 20_000_000
    assert list(personal.device_ids) == [phone.device_id]
    sync = cats[SYNC]
    assert list(sync.device_ids) == [phone.device_id]
    assert sync.HasField("first_time")
    assert sync.HasField("last_time")
    assert sync.first_time.ToMicroseconds() <= sync.last_time.ToMicroseconds()
    assert not sync.HasField("retention")  # the profile is kept until erased

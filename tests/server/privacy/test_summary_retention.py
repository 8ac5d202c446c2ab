from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from pulsesync.server.app import RunningServer
from pulsesync.server.clock import FakeClock
from pulsesync.server.config import (
    DEFAULT_RETENTION_DAYS,
    RetentionConfig,
    ServerConfig,
    load_config,
)
from pulsesync.server.errors import InvalidArgument
from pulsesync.server.privacy.audit import Actor, AuditLog
from pulsesync.server.privacy.retention import DAY_US, RetentionPolicy
from pulsesync.server.rpc.privacy import PrivacyServicer
from pulsesync.v1 import common_pb2, privacy_pb2, privacy_pb2_grpc
from tests.server.privacy.support import feature_use, heart_rate, quarantine, search, store_events
from tests.support.server import pair_device, start_server

T0 = 1_767_225_600_000_000
BEHAVIOR = common_pb2.CONSENT_CATEGORY_BEHAVIOR
ACTIVITY = common_pb2.CONSENT_CATEGORY_ACTIVITY


async def test_summary_counts_per_category(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    phone = await pair_device(server, "ada")
    strap = await pair_device(server, "ada", kind=common_pb2.DEVICE_KIND_WEARABLE_BRIDGE)
    await store_events(
        server,
        phone.device_id,
        [(T0 + 5_000_000, search("q", 1, T0)), (T0 + 9_000_000, feature_use("cards", 2, T0))],
    )
    await store_events(
        server,
        strap.device_id,
        [(T0 + i * 1_000_000, heart_rate("s", 60, i + 1, T0)) for i in range(3)],
    )
    stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
    resp = await stub.GetPrivacySummary(
        privacy_pb2.GetPrivacySummaryRequest(), metadata=phone.metadata, timeout=5
    )
    cats = {c.category: c for c in resp.categories}
    assert cats[BEHAVIOR].record_count == 2
    assert cats[BEHAVIOR].first_time.ToMicroseconds() == T0 + 5_000_000
    assert cats[BEHAVIOR].last_time.ToMicroseconds() == T0 + 9_000_000
    assert list(cats[BEHAVIOR].device_ids) == [phone.device_id]
    assert cats[ACTIVITY].record_count == 3
    assert list(cats[ACTIVITY].device_ids) == [strap.device_id]
    assert cats[ACTIVITY].retention.ToSeconds() == DEFAULT_RETENTION_DAYS * 86_400
    assert cats[common_pb2.CONSENT_CATEGORY_PERSONALIZATION].record_count == 0
    assert resp.device_count == 2
    assert resp.last_activity_time.ToMicroseconds() >= T0 + 9_000_000
    assert {c.category for c in resp.consents if c.granted} == {1, 2, 3, 4}
    assert resp.record_counts["events"] == 5
    assert resp.record_counts["devices"] == 2
    assert resp.nudges_sent == 0
    # a person's own read is not an admin read
    assert (
        await AuditLog(server.app.storage.privacy, server.app.clock).entries(action="summary") == []
    )


async def test_an_admin_read_is_audited(server: RunningServer) -> None:
    await pair_device(server, "zoe")
    servicer = server.servicers["pulsesync.v1.PrivacyService"]
    assert isinstance(servicer, PrivacyServicer)
    uid = await server.app.identity.user_id_by_name("zoe")
    await servicer.center.summary(uid, Actor.ADMIN)
    [entry] = await AuditLog(server.app.storage.privacy, server.app.clock).entries(action="summary")
    assert entry.actor == "admin"
    assert "zoe" not in entry.subject  # a pseudonym is hex
    assert len(entry.subject) == 32


async def test_retention_deletes_only_expired_raw_events(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    async with start_server(tmp_path, clock=clock) as server:
        phone = await pair_device(server, "ada")
        old, young = T0 - 401 * DAY_US, T0 - 399 * DAY_US
        await store_events(
            server,
            phone.device_id,
            [(old + i, search("old", i + 1, old)) for i in range(2500)]  # more than a chunk
            + [(young, search("young", 3000, young))],
        )
        await quarantine(server, phone.device_id, b"x", 9000, old, "old")
        await quarantine(server, phone.device_id, b"y", 9001, young, "young")
        servicer = server.servicers["pulsesync.v1.PrivacyService"]
        assert isinstance(servicer, PrivacyServicer)
        assert await servicer.center.purge_expired() == {"events": 2500, "quarantine": 1}
        async with server.app.db.reader.execute("SELECT COUNT(*) FROM events") as c:
            assert await c.fetchone() == (1,)
        assert await servicer.center.purge_expired() == {"events": 0, "quarantine": 0}
        clock.advance(2 * 86_400)
        assert await servicer.center.purge_expired() == {"events": 1, "quarantine": 1}
        [entry, _] = await AuditLog(server.app.storage.privacy, clock).entries(action="retention")
        assert entry.actor == "system"
        assert entry.detail["deleted"] == {"events": 1, "quarantine": 1}


async def test_the_sweep_runs_when_the_server_starts(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    async with start_server(tmp_path, clock=clock) as server:
        phone = await pair_device(server, "ada")
        await store_events(server, phone.device_id, [(T0 - 500 * DAY_US, search("old", 1, T0))])
    async with start_server(tmp_path, clock=clock) as server:
        for _ in range(100):  # bounded: the first sweep runs as the server starts
            async with server.app.db.reader.execute("SELECT COUNT(*) FROM events") as c:
                if await c.fetchone() == (0,):
                    break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the retention sweep did not run at start")


def test_retention_policy_from_config_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert RetentionPolicy.from_config(ServerConfig()).raw_event_days == DEFAULT_RETENTION_DAYS
    monkeypatch.setenv("PULSESYNC_RETENTION_DAYS", "30")
    assert RetentionPolicy.from_config(load_config()).raw_event_days == 30
    cfg = ServerConfig(retention=RetentionConfig(raw_event_days=7))
    assert RetentionPolicy.from_config(cfg).raw_event_us == 7 * DAY_US
    monkeypatch.setenv("PULSESYNC_RETENTION_DAYS", "0")
    with pytest.raises(InvalidArgument, match="at least 1 day"):
        RetentionPolicy.from_config(load_config())
    monkeypatch.setenv("PULSESYNC_RETENTION_DAYS", "a year")
    with pytest.raises(ValueError, match="PULSESYNC_RETENTION_DAYS='a year' is not valid"):
        load_config()

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from pulsesync.edge_agent.client import Credentials, PairingRequired
from pulsesync.edge_agent.config import AgentSettings
from pulsesync.edge_agent.consent import ConsentView
from pulsesync.edge_agent.consent_sync import CONSENT_FILE, SyncedConsent
from pulsesync.edge_agent.outbox import Outbox
from pulsesync.edge_agent.tracker import Tracker
from pulsesync.server.app import RunningServer
from pulsesync.v1 import common_pb2, events_pb2, privacy_pb2, privacy_pb2_grpc
from tests.support.server import PairedDevice, pair_device, start_server

BEHAVIOR = common_pb2.CONSENT_CATEGORY_BEHAVIOR
ACTIVITY = common_pb2.CONSENT_CATEGORY_ACTIVITY
FAST = AgentSettings(backoff_base_s=0.01, backoff_cap_s=0.05)


def creds(server: RunningServer, device: PairedDevice) -> Credentials:
    return Credentials(server.address, device.device_id, device.token, device.kind)


class Changes:
    """Consent states seen by a SyncedConsent, to wait on without polling."""

    def __init__(self) -> None:
        self.seen: list[frozenset[int]] = []
        self._changed = asyncio.Event()

    def __call__(self, granted: frozenset[int]) -> None:
        self.seen.append(granted)
        self._changed.set()

    async def until(self, want: frozenset[int], timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not self.seen or self.seen[-1] != want:
                self._changed.clear()
                await self._changed.wait()


@contextlib.asynccontextmanager
async def running(view: SyncedConsent) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(view.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, PairingRequired):
            await task


def heart_rate() -> events_pb2.Event:
    e = events_pb2.Event()
    e.heart_rate.sensor_id, e.heart_rate.bpm = "strap", 61
    return e


def test_default_deny_and_unreadable_state(tmp_path: Path) -> None:
    view: ConsentView = SyncedConsent(tmp_path)
    assert not any(view.allows(c) for c in range(6))
    (tmp_path / CONSENT_FILE).write_text("{not json")
    assert SyncedConsent(tmp_path).granted == frozenset()
    (tmp_path / CONSENT_FILE).write_text(
        '{"format": "other", "granted": ["CONSENT_CATEGORY_SYNC"]}'
    )
    assert SyncedConsent(tmp_path).granted == frozenset()


async def test_follows_changes_from_other_devices_and_works_offline(tmp_path: Path) -> None:
    state = tmp_path / "agent"
    async with start_server(tmp_path / "server") as server:
        strap = await pair_device(
            server, "ada", consents=(), kind=common_pb2.DEVICE_KIND_WEARABLE_BRIDGE
        )
        phone = await pair_device(server, "ada")
        changes = Changes()
        view = SyncedConsent(state, creds(server, strap), settings=FAST, on_change=changes)
        async with running(view), grpc.aio.insecure_channel(server.address) as channel:
            stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
            await stub.UpdateConsent(
                privacy_pb2.UpdateConsentRequest(category=ACTIVITY, granted=True),
                metadata=phone.metadata,
                timeout=5,
            )
            await changes.until(frozenset({ACTIVITY}))
            assert view.allows(ACTIVITY)
            assert not view.allows(BEHAVIOR)
            # this device's own choice goes through the server and applies at once
            await view.update(BEHAVIOR, True, "2026-11")
            assert view.allows(BEHAVIOR)
            await stub.UpdateConsent(
                privacy_pb2.UpdateConsentRequest(category=BEHAVIOR, granted=False),
                metadata=phone.metadata,
                timeout=5,
            )
            await changes.until(frozenset({ACTIVITY}))
    assert (state / CONSENT_FILE).stat().st_mode & 0o777 == 0o600
    # the server is gone: a fresh agent honours the last known state
    offline = SyncedConsent(state)
    assert offline.allows(ACTIVITY)
    assert not offline.allows(BEHAVIOR)


async def test_tracker_records_only_what_the_synced_view_allows(tmp_path: Path) -> None:
    async with start_server(tmp_path / "server") as server:
        strap = await pair_device(
            server, "ada", consents=(), kind=common_pb2.DEVICE_KIND_WEARABLE_BRIDGE
        )
        changes = Changes()
        view = SyncedConsent(
            tmp_path / "agent", creds(server, strap), settings=FAST, on_change=changes
        )
        uid = await server.app.identity.user_id_by_name("ada")
        async with (
            running(view),
            await Outbox.open(tmp_path / "agent" / "outbox.db") as outbox,
            Tracker(outbox, view) as tracker,
        ):
            tracker.record(heart_rate())
            await tracker.flush()
            assert await outbox.count() == 0
            assert tracker.stats().dropped_no_consent == 1

            await server.app.consent.set(uid, ACTIVITY, True, device_id="phone")
            await changes.until(frozenset({ACTIVITY}))
            tracker.record(heart_rate())
            await tracker.flush()
            assert await outbox.count() == 1

            await server.app.consent.set(uid, ACTIVITY, False, device_id="phone")
            await changes.until(frozenset())
            tracker.record(heart_rate())
            await tracker.flush()
            assert await outbox.count() == 1
            assert tracker.stats().dropped_no_consent == 2


async def test_erasure_denies_everything_and_asks_to_pair_again(tmp_path: Path) -> None:
    async with start_server(tmp_path / "server") as server:
        strap = await pair_device(server, "ada", kind=common_pb2.DEVICE_KIND_WEARABLE_BRIDGE)
        changes = Changes()
        view = SyncedConsent(
            tmp_path / "agent", creds(server, strap), settings=FAST, on_change=changes
        )
        task = asyncio.create_task(view.run())
        await changes.until(frozenset({1, 2, 3, 4}))
        async with grpc.aio.insecure_channel(server.address) as channel:
            await privacy_pb2_grpc.PrivacyServiceStub(channel).EraseData(
                privacy_pb2.EraseDataRequest(confirmation="ERASE"),
                metadata=strap.metadata,
                timeout=30,
            )
        with pytest.raises(PairingRequired, match="pair"):
            await asyncio.wait_for(task, 5)
        assert view.granted == frozenset()
        assert SyncedConsent(tmp_path / "agent").granted == frozenset()

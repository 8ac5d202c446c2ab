"""ListEventChanges: the timeline's change feed returns every event once, in commit order."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest

from pulsesync.server.app import RunningServer
from pulsesync.server.clock import FakeClock
from pulsesync.server.rpc.base import error_info
from pulsesync.server.storage.db import load_migrations, migrate
from pulsesync.v1 import timeline_pb2, timeline_pb2_grpc
from tests.server.timeline.events import batch, heart_rate, screen_view, steps, ts, upload
from tests.support.server import PairedDevice, pair_device, start_server

DAY_US = 86_400 * 1_000_000


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fake_server(tmp_path: Path, clock: FakeClock):  # type: ignore[no-untyped-def]
    async with start_server(tmp_path, clock=clock) as running:
        yield running


async def drain(
    stub: Any, device: PairedDevice, token: str, size: int
) -> tuple[list[tuple[str, int]], str]:
    """Follow the feed from token until caught up: (device_id, seq) of each event, new token."""
    got: list[tuple[str, int]] = []
    while True:
        resp = await stub.ListEventChanges(
            timeline_pb2.ListEventChangesRequest(sync_token=token, page_size=size),
            metadata=device.metadata,
            timeout=10,
        )
        got += [(e.device_id, e.event.seq) for e in resp.events]
        assert resp.next_sync_token
        token = resp.next_sync_token
        if resp.caught_up:
            return got, token


async def test_feed_returns_each_event_once_in_commit_order_late_ones_included(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    phone = await pair_device(fake_server, "ada")
    watch = await pair_device(fake_server, "ada")
    bo = await pair_device(fake_server, "bo")
    now = clock.now_us()
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        await upload(
            ch, phone.metadata, [batch(1, now, [screen_view(s, now + s) for s in (1, 2, 3)])]
        )
        await upload(ch, bo.metadata, [batch(1, now, [heart_rate(1, now)])])
        # The watch syncs a day late: its events happened before the phone's.
        clock.advance(1)
        later = clock.now_us()
        await upload(
            ch,
            watch.metadata,
            [batch(1, later, [steps(1, now - DAY_US), steps(2, now - DAY_US + 60_000_000)])],
        )
        # A retry of phone seq 2 (a duplicate) with one new event: only the new one is a change.
        again = screen_view(2, now + 2)
        await upload(ch, phone.metadata, [batch(2, later, [again, screen_view(5, later)])])
        stub = timeline_pb2_grpc.TimelineServiceStub(ch)
        got, token = await drain(stub, phone, "", size=2)
        expected = [
            (phone.device_id, 1), (phone.device_id, 2), (phone.device_id, 3),
            (watch.device_id, 1), (watch.device_id, 2),
            (phone.device_id, 5),
        ]  # fmt: skip
        assert got == expected
        # One big page gives the same feed.
        assert (await drain(stub, phone, "", size=5000))[0] == expected

        # Up to date: nothing new, the token still works.
        nothing, token2 = await drain(stub, phone, token, size=50)
        assert nothing == []
        # A very late event (two days old) arrives: the next sync returns just it, although
        # in time order it comes first.
        clock.advance(1)
        await upload(ch, watch.metadata, [batch(2, clock.now_us(), [steps(3, now - 2 * DAY_US)])])
        new, _ = await drain(stub, watch, token2, size=50)
        assert new == [(watch.device_id, 3)]
        listed = await stub.ListEvents(
            timeline_pb2.ListEventsRequest(
                start_time=ts(now - 3 * DAY_US), end_time=ts(later + DAY_US)
            ),
            metadata=phone.metadata,
            timeout=10,
        )
        assert (listed.events[0].device_id, listed.events[0].event.seq) == (watch.device_id, 3)

        # bo's feed holds only bo's event; ada's token is not bo's.
        assert (await drain(stub, bo, "", size=10))[0] == [(bo.device_id, 1)]
        for bad in (token, "not-a-token", "AAAA"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListEventChanges(
                    timeline_pb2.ListEventChangesRequest(sync_token=bad),
                    metadata=bo.metadata,
                    timeout=10,
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(err.value).reason == "INVALID_SYNC_TOKEN"  # type: ignore[union-attr]


def test_migration_backfills_changes_for_events_stored_before_it(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    migrate(path)
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO users (user_id, name, create_us) VALUES (1, 'ada', 0)")
    rows = [(1, 7, s, s * 10, 1, b"x", r) for s, r in ((1, 5), (2, 5), (3, 9), (7, 20), (8, 20))]
    conn.executemany(
        "INSERT INTO events (user_id, device_pk, seq, t_us, kind, body, received_us)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    conn.execute("DELETE FROM event_changes")
    (sql,) = [m for m in load_migrations() if m.version == 8]
    after = sql.sql.split("-- Events stored before the feed existed")[1]
    backfill = after.split("\n", 1)[1].split("-- Token rotation")[0]
    conn.executescript(backfill)
    got = conn.execute(
        "SELECT device_pk, seq_low, seq_high, commit_us FROM event_changes ORDER BY change_id"
    ).fetchall()
    conn.close()
    assert got == [(7, 1, 3, 9), (7, 7, 8, 20)]

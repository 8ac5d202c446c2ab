"""Events keep their true time when the device's wall clock is stepped before they are sent."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

from pulsesync.edge_agent.consent import StaticConsent
from pulsesync.edge_agent.outbox import Outbox
from pulsesync.edge_agent.tracker import Tracker
from pulsesync.edge_agent.uplink import Uplink
from pulsesync.v1 import events_pb2
from tests.edge_agent.fake_ingest import FakeIngest, credentials_for, fake_ingest_server
from tests.edge_agent.helpers import taps, until_empty

HOUR_US = 3600 * 1_000_000
TRUE_US = 1_780_000_000_000_000  # the true time when the first event is recorded


class WallClock:
    """A wall clock a test can step."""

    def __init__(self, now_us: int) -> None:
        self.t = now_us

    def now_us(self) -> int:
        return self.t


class Mono:
    """A monotonic clock a test advances."""

    def __init__(self) -> None:
        self.ns = 5_000_000_000_000

    def __call__(self) -> int:
        return self.ns


@contextlib.asynccontextmanager
async def uploading(outbox: Outbox, wall: WallClock) -> AsyncIterator[FakeIngest]:
    fake = FakeIngest()
    async with fake_ingest_server(fake) as address:
        task = asyncio.create_task(Uplink(outbox, credentials_for(address), clock=wall).run())
        try:
            await until_empty(outbox, timeout_s=60)
            yield fake
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def server_time(fake: FakeIngest, seq: int, receive_us: int) -> int:
    """Where a server correcting the device's clock skew (receive - sent) places the event."""
    device_us, sent_us = fake.times[seq]
    return device_us + (receive_us - sent_us)


async def test_events_recorded_before_a_clock_step_keep_their_true_time(tmp_path: Path) -> None:
    wall, mono = WallClock(TRUE_US + 2 * HOUR_US), Mono()  # the device clock is 2 h fast
    async with await Outbox.open(
        tmp_path / "o.db", clock=wall, monotonic_ns=mono, boot_id="boot-1"
    ) as outbox:
        tracker = Tracker(outbox, StaticConsent(), clock=wall, monotonic_ns=mono, linger_s=0)
        async with tracker:
            tracker.tap("study", "home", "a")  # true time TRUE_US
            mono.ns += 10_000_000_000
            wall.t += 10_000_000
            tracker.tap("study", "home", "b")  # true time TRUE_US + 10 s, still queued
            await tracker.flush()
            wall.t -= 2 * HOUR_US  # the device clock is corrected, 1 s after the second tap
            mono.ns += 1_000_000_000
            wall.t += 1_000_000
            tracker.tap("study", "home", "c")  # recorded with the corrected clock
            await tracker.flush()
            mono.ns += 20_000_000_000  # sent 20 s later
            wall.t += 20_000_000
            async with uploading(outbox, wall) as fake:
                pass
    receive_us = TRUE_US + 31_000_000  # the server's (true) clock when the batch arrives
    assert server_time(fake, 1, receive_us) == TRUE_US
    assert server_time(fake, 2, receive_us) == TRUE_US + 10_000_000
    assert server_time(fake, 3, receive_us) == TRUE_US + 11_000_000
    assert fake.times[3][0] == TRUE_US + 11_000_000  # unstepped events are sent as recorded


async def test_a_step_while_events_wait_in_the_tracker_queue(tmp_path: Path) -> None:
    wall, mono = WallClock(TRUE_US - 2 * HOUR_US), Mono()  # 2 h slow this time
    async with await Outbox.open(tmp_path / "o.db", clock=wall, monotonic_ns=mono) as outbox:
        tracker = Tracker(outbox, StaticConsent(), clock=wall, monotonic_ns=mono)
        tracker.tap("study", "home", "a")  # not started: stays in memory
        mono.ns += 5_000_000_000
        wall.t += 2 * HOUR_US + 5_000_000
        await tracker.close()  # written to the outbox after the step
        async with uploading(outbox, wall) as fake:
            pass
    assert fake.times[1][0] == TRUE_US


async def test_events_from_an_earlier_boot_keep_their_recorded_time(tmp_path: Path) -> None:
    wall, mono = WallClock(TRUE_US), Mono()
    async with await Outbox.open(
        tmp_path / "o.db", clock=wall, monotonic_ns=mono, boot_id="boot-1"
    ) as outbox:
        await outbox.append(taps(1))
    mono.ns = 1_000_000_000  # after a reboot the monotonic clock starts again
    wall.t += HOUR_US
    async with (
        await Outbox.open(
            tmp_path / "o.db", clock=wall, monotonic_ns=mono, boot_id="boot-2"
        ) as outbox,
        uploading(outbox, wall) as fake,
    ):
        pass
    assert fake.times[1][0] == TRUE_US


async def test_an_outbox_of_schema_1_is_upgraded_and_its_events_keep_their_time(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.db"
    old = events_pb2.Event(seq=1, event_id="e-1")
    old.tap.app, old.tap.screen, old.tap.target = "study", "home", "a"
    old.device_time.FromMicroseconds(TRUE_US)
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY, body BLOB NOT NULL);"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
        "INSERT INTO meta VALUES ('next_seq', 2), ('acked_through', 0), ('last_ack_us', 0);"
        "PRAGMA user_version = 1;"
    )
    conn.execute("INSERT INTO outbox VALUES (1, ?)", (old.SerializeToString(),))
    conn.commit()
    conn.close()
    wall = WallClock(TRUE_US + 3 * HOUR_US)
    async with await Outbox.open(path, clock=wall) as outbox:
        assert [(e.seq, age) for e, age in await outbox.pending_with_age()] == [(1, None)]
        await outbox.append(taps(1))
        async with uploading(outbox, wall) as fake:
            pass
    assert fake.times[1][0] == TRUE_US
    assert fake.times[2][0] == TRUE_US + 3 * HOUR_US

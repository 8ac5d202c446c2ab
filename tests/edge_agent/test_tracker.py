from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from pulsesync.edge_agent.consent import StaticConsent
from pulsesync.edge_agent.outbox import Outbox
from pulsesync.edge_agent.tracker import Tracker
from pulsesync.v1 import common_pb2, events_pb2


class GatedOutbox(Outbox):
    """An outbox whose appends wait for a gate: a disk that is busy for as long as we like."""

    gate: asyncio.Event
    batches: list[int]

    async def append(
        self, events: Sequence[events_pb2.Event], *, mono_ns: Sequence[int] | None = None
    ) -> int:
        self.batches.append(len(events))
        await self.gate.wait()
        return await super().append(events, mono_ns=mono_ns)


@pytest.fixture
async def gated(tmp_path: Path):
    ob = await GatedOutbox.open(tmp_path / "o.db")
    assert isinstance(ob, GatedOutbox)
    ob.gate, ob.batches = asyncio.Event(), []
    try:
        yield ob
    finally:
        await ob.close()


class _Clock:
    def now_us(self) -> int:
        return 1_767_225_600_000_000


async def test_recording_from_another_thread_never_blocks_on_a_busy_outbox(
    gated: GatedOutbox,
) -> None:
    tracker = Tracker(gated, StaticConsent(), linger_s=0.001, max_batch=500)
    await tracker.start()

    def app_thread() -> None:
        for i in range(5000):
            tracker.tap("study", "deck", f"card_{i}")

    t = threading.Thread(target=app_thread)
    t.start()
    await asyncio.to_thread(t.join, 10)
    assert not t.is_alive(), "the app thread returned although the outbox never accepted a write"
    assert await gated.count() == 0
    assert gated.batches, "the flusher is stuck in a write"
    gated.gate.set()
    await tracker.close()
    stored = await gated.pending(limit=10_000)
    assert [e.tap.target for e in stored] == [f"card_{i}" for i in range(5000)]
    assert [e.seq for e in stored] == list(range(1, 5001))
    assert max(gated.batches) <= 500
    s = tracker.stats()
    assert (s.recorded, s.written, s.queued, s.dropped_overflow) == (5000, 5000, 0, 0)


async def test_overflow_drops_and_counts_instead_of_blocking(gated: GatedOutbox) -> None:
    tracker = Tracker(gated, StaticConsent(), linger_s=0, max_batch=10, max_queue=50)
    await tracker.start()
    for i in range(200):
        tracker.tap("study", "home", str(i))
    await asyncio.sleep(0)
    s = tracker.stats()
    assert s.dropped_overflow > 0
    assert s.recorded + s.dropped_overflow == 200
    gated.gate.set()
    await tracker.close()
    assert await gated.count() == s.recorded


async def test_categories_without_consent_are_dropped(tmp_path: Path) -> None:
    async with await Outbox.open(tmp_path / "o.db") as ob:
        tracker = Tracker(ob, StaticConsent({common_pb2.CONSENT_CATEGORY_ACTIVITY}))
        async with tracker:
            tracker.screen_view("study", "home", 3.5)
            tracker.tap("study", "home", "start")
            tracker.search("study", "verbs", 4)
            sid = tracker.session_start("study")
            hr = events_pb2.Event()
            hr.heart_rate.bpm = 72
            tracker.record(hr)
            nudge = events_pb2.Event()
            nudge.nudge_interaction.nudge_id = "n1"
            tracker.record(nudge)
        stored = await ob.pending()
    assert sid, "a session id is returned even when the event is dropped"
    assert [e.WhichOneof("payload") for e in stored] == ["heart_rate"]
    assert tracker.stats().dropped_no_consent == 5


async def test_typed_methods_build_the_events(tmp_path: Path) -> None:
    async with await Outbox.open(tmp_path / "o.db") as ob:
        async with Tracker(ob, StaticConsent(), clock=_Clock()) as tracker:
            sid = tracker.session_start("study", at_us=1_767_225_000_000_000)
            tracker.screen_view("study", "deck/3", 12.25)
            tracker.feature_use("study", "flashcards", 60)
            tracker.session_end("study", sid, 90.0)
        stored = await ob.pending()
    assert [e.WhichOneof("payload") for e in stored] == [
        "session_start", "screen_view", "feature_use", "session_end"]  # fmt: skip
    assert stored[0].device_time.ToMicroseconds() == 1_767_225_000_000_000
    assert stored[1].device_time.ToMicroseconds() == 1_767_225_600_000_000
    assert stored[1].screen_view.dwell.ToMicroseconds() == 12_250_000
    assert stored[2].feature_use.duration.seconds == 60
    assert stored[3].session_end.session_id == sid


async def test_events_are_batched_per_transaction(gated: GatedOutbox) -> None:
    gated.gate.set()
    tracker = Tracker(gated, StaticConsent(), linger_s=0.05, max_batch=100)
    await tracker.start()
    for i in range(250):
        tracker.tap("study", "home", str(i))
    await tracker.close()
    assert sum(gated.batches) == 250
    assert max(gated.batches) <= 100
    assert len(gated.batches) <= 4, "lingering gathers events into few transactions"


async def test_without_a_consent_view_nothing_is_recorded(tmp_path: Path) -> None:
    async with await Outbox.open(tmp_path / "o.db") as ob:
        async with Tracker(ob) as tracker:
            tracker.tap("study", "home", "start")
            hr = events_pb2.Event()
            hr.heart_rate.bpm = 72
            tracker.record(hr)
        stored = await ob.pending()
    assert stored == [], "the default consent view must deny every category"
    assert tracker.stats().dropped_no_consent == 2


class _CountingOutbox(Outbox):
    """The real outbox, counting write attempts so a test can wait for retries."""

    attempts = 0
    attempted: asyncio.Event | None = None

    async def append(
        self, events: Sequence[events_pb2.Event], *, mono_ns: Sequence[int] | None = None
    ) -> int:
        type(self).attempts += 1
        if type(self).attempted is not None:
            type(self).attempted.set()  # type: ignore[union-attr]
        return await super().append(events, mono_ns=mono_ns)


def _big_tap(i: int) -> events_pb2.Event:
    e = events_pb2.Event()
    e.tap.app, e.tap.screen, e.tap.target = "app", "screen", f"{i}-" + "x" * 2000
    return e


async def _fill_disk(outbox: Outbox) -> None:
    # SQLite's page limit gives a real SQLITE_FULL, as a full disk does.
    conn = outbox._writer
    (pages,) = next(iter(await conn.execute_fetchall("PRAGMA page_count")))
    await conn.execute(f"PRAGMA max_page_count = {pages}")


async def test_full_disk_raises_the_agent_error_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from pulsesync.edge_agent import tracker as tracker_module
    from pulsesync.edge_agent.errors import OutboxFull

    monkeypatch.setattr(tracker_module, "_RETRY_WRITE_S", 0.001)
    caplog.set_level(logging.WARNING, logger="pulsesync.edge_agent.tracker")
    _CountingOutbox.attempts, _CountingOutbox.attempted = 0, asyncio.Event()
    outbox = await _CountingOutbox.open(tmp_path / "o.db")
    try:
        await _fill_disk(outbox)
        tracker = Tracker(outbox, StaticConsent(), linger_s=0)
        for i in range(50):
            tracker.record(_big_tap(i))
        with pytest.raises(OutboxFull, match="disk is full"):
            await tracker.flush()
        with pytest.raises(OutboxFull):
            await tracker.record_durable(_big_tap(99))
        assert tracker.stats().queued == 51  # kept in memory, in order, for the next attempt
        await tracker.start()
        async with asyncio.timeout(100):  # the flusher retries many times meanwhile
            while _CountingOutbox.attempts < 30:
                _CountingOutbox.attempted.clear()
                await _CountingOutbox.attempted.wait()
        warnings = [r for r in caplog.records if "disk is full" in r.getMessage()]
        assert len(warnings) == 1
        assert warnings[0].exc_info is None  # a clear line, not a traceback
        await outbox._writer.execute("PRAGMA max_page_count = 1073741823")  # space freed
        await tracker.flush()
        assert tracker.stats().queued == 0
        assert await outbox.count() == 51
        await tracker.close()
    finally:
        await outbox.close()


async def test_agent_run_on_a_full_disk_exits_1_saying_what_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pulsesync-agent run` that ends while the disk is full: exit 1, one message saying that
    the events still in memory are lost with the stop (not "kept in memory meanwhile")."""
    from pulsesync.edge_agent import agent as agent_module
    from pulsesync.edge_agent import cli
    from pulsesync.edge_agent.client import Credentials

    class FullOutbox(Outbox):
        @classmethod
        async def open(cls, path: Path, *args: Any, **kwargs: Any) -> Outbox:  # type: ignore[override]
            outbox = await Outbox.open(path, *args, **kwargs)
            await _fill_disk(outbox)
            return outbox

    monkeypatch.setattr(agent_module, "Outbox", FullOutbox)
    Credentials(
        server="127.0.0.1:9",  # nothing listens: the events stay in the agent
        device_id="dev_test",
        token="t",
        kind=common_pb2.DEVICE_KIND_PHONE,
    ).save(tmp_path / "credentials.json")
    args = cli.build_parser().parse_args(
        [
            "--state-dir",
            str(tmp_path),
            "run",
            "--source",
            "simulated-phone",
            "--speed",
            "3000",
            "--duration",
            "2",
            "--drain-timeout",
            "1",
        ]
    )
    assert await args.handler(args) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "is full" in err
    assert "are lost with this stop" in err
    assert "Traceback" not in err

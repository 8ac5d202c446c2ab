from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from pulsesync.edge_agent.outbox import Outbox, OutboxError, read_stats
from tests.edge_agent.helpers import taps


class _Clock:
    def __init__(self, now_us: int) -> None:
        self.now = now_us

    def now_us(self) -> int:
        return self.now


async def test_seq_is_never_reused_across_acks_and_restarts(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with await Outbox.open(path) as ob:
        assert await ob.append(taps(3)) == 3
        assert await ob.ack(3) == 3
        assert await ob.count() == 0
    async with await Outbox.open(path) as ob:  # a restart after everything was deleted
        batch = taps(2)
        assert await ob.append(batch) == 5
        assert [e.seq for e in batch] == [4, 5]
    async with await Outbox.open(path) as ob:
        assert [e.seq for e in await ob.pending()] == [4, 5]
        assert ob.last_seq == 5
        assert ob.acked_through == 3


async def test_append_fills_id_and_time_only_where_unset(tmp_path: Path) -> None:
    async with await Outbox.open(tmp_path / "o.db", clock=_Clock(1_700_000_000_000_000)) as ob:
        given = taps(2)
        given[0].event_id = "0b6f0b52-5c43-4e4a-9a35-5b0f6f0ad7a1"
        given[0].device_time.FromMicroseconds(1_600_000_000_000_000)
        given[1].seq = 99  # a producer cannot choose the sequence number
        await ob.append(given)
        stored = await ob.pending()
    assert [e.seq for e in stored] == [1, 2]
    assert stored[0].event_id == "0b6f0b52-5c43-4e4a-9a35-5b0f6f0ad7a1"
    assert stored[0].device_time.ToMicroseconds() == 1_600_000_000_000_000
    assert uuid.UUID(stored[1].event_id).version == 4
    assert stored[1].device_time.ToMicroseconds() == 1_700_000_000_000_000
    assert stored[1].tap.target == "button_1"


async def test_ack_deletes_only_through_the_acked_seq(tmp_path: Path) -> None:
    async with await Outbox.open(tmp_path / "o.db") as ob:
        await ob.append(taps(10))
        assert await ob.ack(4) == 4
        assert [e.seq for e in await ob.pending()] == [5, 6, 7, 8, 9, 10]
        assert await ob.ack(2) == 0, "an older ack changes nothing"
        assert await ob.count() == 6
        stats = await ob.stats()
        assert (stats.depth, stats.last_seq, stats.acked_through) == (6, 10, 4)
        assert stats.last_ack_us > 0


async def test_pending_pages_in_seq_order(tmp_path: Path) -> None:
    async with await Outbox.open(tmp_path / "o.db") as ob:
        for _ in range(3):
            await ob.append(taps(7))
        assert [e.seq for e in await ob.pending(after_seq=5, limit=4)] == [6, 7, 8, 9]
        assert [e.seq for e in await ob.pending(after_seq=19, limit=4)] == [20, 21]
        assert await ob.pending(after_seq=21) == []


async def test_listeners_hear_appends_and_acks(tmp_path: Path) -> None:
    heard: list[str] = []
    async with await Outbox.open(tmp_path / "o.db") as ob:
        remove = ob.add_listener(lambda: heard.append("x"))
        await ob.append(taps(1))
        await ob.ack(1)
        remove()
        await ob.append(taps(1))
    assert heard == ["x", "x"]


async def test_stats_readable_from_another_process_view(tmp_path: Path) -> None:
    async with await Outbox.open(tmp_path / "o.db") as ob:
        await ob.append(taps(5))
        await ob.ack(2)
        stats = read_stats(tmp_path / "o.db")
    assert (stats.depth, stats.last_seq, stats.acked_through) == (3, 5, 2)


async def test_not_an_outbox_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "o.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxError, match="damaged or is not a pulsesync-agent outbox"):
        await Outbox.open(bad)


async def test_cancelled_caller_never_leaves_a_transaction_open(tmp_path: Path) -> None:
    import asyncio

    async with await Outbox.open(tmp_path / "o.db") as ob:
        await ob.append(taps(10))
        for _ in range(3):  # cancel at several points of the transaction
            ack = asyncio.create_task(ob.ack(ob.acked_through + 2))
            batch = taps(3)
            append = asyncio.create_task(ob.append(batch))
            await asyncio.sleep(0)
            ack.cancel()
            append.cancel()
            for task in (ack, append):
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert all(e.seq > 0 for e in batch), "the append ran to its commit"
        assert ob.acked_through == 6
        assert await ob.append(taps(1)) == 20
        assert [e.seq for e in await ob.pending()] == list(range(7, 21))

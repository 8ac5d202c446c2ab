"""The ingest writer process: shared commits, dedupe, stop, restart, and yielding to the
server's own transactions."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pulsesync.server.nudges.batch_summary import COMMIT_HOOK, summarize
from pulsesync.server.storage.db import Database
from pulsesync.server.timeline import committer, writer
from pulsesync.server.timeline.writer import GroupCommitWriter, PendingBatch, WriterClosed
from pulsesync.v1 import events_pb2


def _batch(device_pk: int, seqs: list[int], ids: list[str] | None = None) -> PendingBatch:
    ids = ids or [f"{device_pk}-{s}" for s in seqs]
    rows = [
        (1, device_pk, s, 1000 + s, 20, events_pb2.Event(event_id=i, seq=s).SerializeToString(), 0)
        for s, i in zip(seqs, ids, strict=True)
    ]
    return PendingBatch(device_pk, 1, 0, rows, [], seqs == sorted(set(seqs)), None)


async def test_concurrent_batches_share_one_commit(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "db.sqlite") as db:
        commits: list[int] = []
        writer = GroupCommitWriter(db, COMMIT_HOOK, commits.append)
        await writer.start()
        # Batches that arrive while one of the server's own transactions runs are committed
        # together after it (without it, how many share a commit depends on timing).
        async with db.transaction():
            futures = [writer.submit(_batch(dev, [1, 2, 3])) for dev in range(1, 11)]
            await asyncio.sleep(0.3)
        outcomes = [await f for f in futures]
        assert sum(commits) == 1
        assert all(len(o.inserted) == 3 for o in outcomes)
        # Replays and conflicts in one group, behind a new batch of the same device.
        async with db.transaction():
            again = [
                writer.submit(_batch(1, [4, 5])),
                writer.submit(_batch(1, [3, 4, 5, 6])),
                writer.submit(_batch(2, [2], ids=["other"])),
            ]
            await asyncio.sleep(0.3)
        new, replay, conflict = [await f for f in again]
        await writer.stop()
        assert sum(commits) == 2
        assert (len(new.inserted), new.duplicates) == (2, 0)
        assert ([r[2] for r in replay.inserted], replay.duplicates) == ([6], 3)
        assert [c.seq for c in conflict.conflicts] == [2]
        # Each answer carries what the commit hook made of the rows it inserted (times are 1000 + seq).
        assert new.derived == summarize(new.inserted)
        assert new.derived is not None
        assert new.derived[:2] == (1004, 1005)
        assert replay.derived is not None
        assert replay.derived[:2] == (1006, 1006)
        assert conflict.derived is None
        async with db.reader.execute("SELECT count(*) FROM events") as c:
            assert (await c.fetchone()) == (33,)
        async with db.reader.execute("SELECT device_pk, seq, reason FROM quarantine") as c:
            assert list(await c.fetchall()) == [(2, 2, "SEQUENCE_CONFLICT")]


async def _count(db: Database) -> int:
    async with db.reader.execute("SELECT count(*) FROM events") as c:
        row = await c.fetchone()
    assert row is not None
    return int(row[0])


def count_and_device(rows, device_pk):
    """A commit hook for the test below: what it derives names the rows it was given."""
    return (len(rows), device_pk, [r[2] for r in rows])


async def test_the_commit_hook_is_named_by_the_caller(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "db.sqlite") as db:
        plain = GroupCommitWriter(db)
        await plain.start()
        assert (await plain.submit(_batch(1, [1, 2]))).derived is None
        await plain.stop()
        hooked = GroupCommitWriter(db, f"{__name__}:count_and_device")
        await hooked.start()
        # Only the rows this commit inserted reach the hook (seq 2 is a replay).
        out = await hooked.submit(_batch(1, [2, 3, 4]))
        await hooked.stop()
        assert out.derived == (2, 1, [3, 4])


async def test_stop_commits_everything_queued(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with await Database.open(tmp_path / "db.sqlite") as db:
        w = GroupCommitWriter(db)
        await w.start()
        futures = [w.submit(_batch(dev, list(range(1, 101)))) for dev in range(1, 21)]
        await w.stop()
        assert all(f.done() and not f.exception() for f in futures)
        assert await _count(db) == 2000
        late = w.submit(_batch(99, [1]))
        with pytest.raises(WriterClosed):
            await late
    # The process exited on its own and was reaped by asyncio, not by a kill's poll.
    assert "Unknown child process" not in caplog.text


async def test_waits_for_the_servers_own_transaction(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "db.sqlite") as db:
        w = GroupCommitWriter(db)
        await w.start()
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO users (name, create_us) VALUES ('ada', 0)")
            pending = w.submit(_batch(1, [1, 2]))
            await asyncio.sleep(0.3)
            assert not pending.done(), "the writer went ahead of a running transaction"
        assert len((await asyncio.wait_for(pending, 10)).inserted) == 2
        await w.stop()


async def test_a_dead_writer_process_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "RESTART_DELAY_S", 0.05)
    async with await Database.open(tmp_path / "db.sqlite") as db:
        w = GroupCommitWriter(db)
        await w.start()
        async with db.transaction():  # holds the writer before its next group
            lost = w.submit(_batch(1, [1, 2, 3]))
            await asyncio.sleep(0.1)
            w._proc.kill()  # type: ignore[union-attr]
            with pytest.raises(WriterClosed, match="resend"):
                await asyncio.wait_for(lost, 10)
            # Until the new process runs, a batch is refused at once (never left waiting).
            with pytest.raises(WriterClosed, match="restarting"):
                await asyncio.wait_for(w.submit(_batch(1, [1])), 1)
        for _ in range(200):  # a new process starts after RESTART_DELAY_S
            if w._proc is not None and w._proc.returncode is None:
                break
            await asyncio.sleep(0.05)
        resent = await asyncio.wait_for(w.submit(_batch(1, [1, 2, 3])), 10)
        await w.stop()
        assert len(resent.inserted) == 3
        assert await _count(db) == 3


def test_turn_signals_hold_and_release_the_committer() -> None:
    read_end, write_end = os.pipe()
    turn = committer._Turn(read_end)
    try:
        os.write(write_end, b"1")
        for _ in range(500):  # until the follower thread has read the signal
            if not turn._free.is_set():
                break
            threading.Event().wait(0.01)
        waited = threading.Event()

        def wait_turn() -> None:
            turn.wait()
            waited.set()

        threading.Thread(target=wait_turn, daemon=True).start()
        assert not waited.wait(0.2), "a held turn must block"
        os.write(write_end, b"0")
        assert waited.wait(5)
    finally:
        os.close(write_end)  # the follower thread ends at end of pipe


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_the_process_logs_in_the_servers_format(tmp_path: Path, log_format: str) -> None:
    control_r, control_w = os.pipe()
    try:
        done = subprocess.run(
            [sys.executable, "-m", committer.__name__, str(tmp_path / "no" / "db.sqlite"),
             str(control_r), "1000", log_format],
            pass_fds=(control_r,), stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(control_r)
        os.close(control_w)
    assert done.returncode == 1
    (first, *rest) = done.stderr.splitlines()
    if log_format == "json":
        assert rest == []  # the traceback is inside the one JSON line
        record = json.loads(first)
        assert (record["level"], record["logger"]) == ("error", committer.__name__)
        assert record["message"] == "the ingest writer could not open the database"
        assert "unable to open database file" in record["exception"]
    else:
        assert "ERROR pulsesync.server.timeline.committer: the ingest writer could not" in first
        assert "unable to open database file" in done.stderr

from __future__ import annotations

from pathlib import Path

from pulsesync.server.storage.db import Database
from pulsesync.server.timeline.writer import GroupCommitWriter, PendingBatch
from pulsesync.v1 import events_pb2


def _batch(device_pk: int, seqs: list[int], ids: list[str] | None = None) -> PendingBatch:
    ids = ids or [f"{device_pk}-{s}" for s in seqs]
    rows = [
        (1, device_pk, s, 1000 + s, 20, events_pb2.Event(event_id=i, seq=s).SerializeToString(), 0)
        for s, i in zip(seqs, ids, strict=True)
    ]
    return PendingBatch(device_pk, 1, 0, rows, ids, [], seqs == sorted(set(seqs)), None)


async def test_concurrent_batches_share_one_commit(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "db.sqlite") as db:
        writer = GroupCommitWriter(db)
        await writer.start()
        batches = [_batch(dev, [1, 2, 3]) for dev in range(1, 11)]
        futures = [writer.submit(b) for b in batches]
        outcomes = [await f for f in futures]
        assert writer.commits == 1
        assert all(len(o.inserted) == 3 for o in outcomes)
        # Replays and conflicts in one group, behind a new batch of the same device.
        again = [
            writer.submit(_batch(1, [4, 5])),
            writer.submit(_batch(1, [3, 4, 5, 6])),
            writer.submit(_batch(2, [2], ids=["other"])),
        ]
        new, replay, conflict = [await f for f in again]
        await writer.stop()
        assert writer.commits == 2
        assert (len(new.inserted), new.duplicates) == (2, 0)
        assert ([r[2] for r in replay.inserted], replay.duplicates) == ([6], 3)
        assert [c.seq for c in conflict.conflicts] == [2]
        async with db.reader.execute("SELECT count(*) FROM events") as c:
            assert (await c.fetchone()) == (33,)
        async with db.reader.execute("SELECT device_pk, seq, reason FROM quarantine") as c:
            assert list(await c.fetchall()) == [(2, 2, "SEQUENCE_CONFLICT")]

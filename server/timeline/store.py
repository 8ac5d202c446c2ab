"""Reading the merged per-user timeline: the Python API other server components use.

    store = TimelineStore(app.db)
    events = await store.events(user_id, start_us, end_us, kinds={EVENT_KIND_STEPS})
    buckets = await store.summarize(user_id, start_us, end_us, bucket_us=60_000_000)

Events come back in the timeline's order: corrected time, then device, then sequence number,
so late and out-of-order arrivals sit where they happened. Every query is scoped by user_id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Final

from pulsesync.server.storage.db import Database
from pulsesync.server.timeline.aggregates import SUMMARY_KINDS, ActivityBucket, summarize_events
from pulsesync.v1 import events_pb2

__all__ = [
    "ActivityBucket",
    "ChangeCursor",
    "Cursor",
    "StoredEvent",
    "TimelineStore",
    "UploadState",
]

# A summary reads every event of its range into memory: a year of one-minute buckets is
# already more than anyone can look at, so larger requests are refused rather than served slowly.
MAX_SUMMARY_BUCKETS: Final = 100_000


# Rows a page parses on the event loop; a larger page is parsed in a worker thread.
INLINE_PARSE_ROWS: Final = 100


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One event of the merged timeline, as stored."""

    device_id: str
    device_kind: int  # pulsesync.v1.DeviceKind
    seq: int
    t_us: int  # corrected (server-clock) time, microseconds since the epoch
    kind: int  # pulsesync.v1.EventKind
    event: events_pb2.Event


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    """A position in the timeline's order: after the event at (t_us, device_pk, seq)."""

    t_us: int
    device_pk: int
    seq: int


@dataclass(frozen=True, slots=True)
class UploadState:
    """The server's watermark for one device."""

    acked_through_seq: int  # every seq at or below is handled for good; 0 when none is
    last_commit_us: int | None  # receive time of the device's latest committed event


async def upload_state(db: Database, user_id: int, device_pk: int) -> UploadState:
    """The device's acked-through mark and last commit time, from what is stored.

    The mark is the contiguous watermark an upload ack reports: every seq at or below it is
    stored, quarantined or refused for good. The ingest writer advances it in the same
    transaction as the rows it covers (see committer.Watermark).
    """
    async with db.reader.execute(
        "SELECT ack_watermark, (SELECT max(received_us) FROM ("
        " SELECT received_us FROM events WHERE device_pk = ?1"
        " UNION ALL SELECT received_us FROM quarantine WHERE user_id = ?2 AND device_pk = ?1))"
        " FROM devices WHERE device_pk = ?1 AND user_id = ?2",
        (device_pk, user_id),
    ) as c:
        row = await c.fetchone()
    if row is None or not row[0]:
        return UploadState(0, None if row is None or row[1] is None else int(row[1]))
    return UploadState(int(row[0]), None if row[1] is None else int(row[1]))


@dataclass(frozen=True, slots=True, order=True)
class ChangeCursor:
    """A position in the change feed: after the event (change_id, seq); (0, 0) is the start."""

    change_id: int
    seq: int


def _parse_page(rows: Sequence[Sequence[object]]) -> list[StoredEvent]:
    """The events of page rows (t_us, device_pk, seq, kind, body, device_id, device_kind)."""
    parse = events_pb2.Event.FromString
    return [
        StoredEvent(str(device_id), int(dkind), int(seq), int(t_us), int(kind), parse(body))  # type: ignore[call-overload,arg-type]
        for t_us, _pk, seq, kind, body, device_id, dkind in rows
    ]


class TimelineStore:
    """Read access to stored events; reads go through the read connection only."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def events(
        self,
        user_id: int,
        start_us: int,
        end_us: int,
        kinds: Collection[int] | None = None,
        *,
        device_ids: Collection[str] | None = None,
    ) -> list[StoredEvent]:
        """All of the user's events with start_us <= corrected time < end_us, in order."""
        out: list[StoredEvent] = []
        cursor: Cursor | None = None
        while True:
            page, cursor = await self.page(
                user_id, start_us, end_us, kinds, device_ids=device_ids, after=cursor, limit=5000
            )
            out.extend(page)
            if cursor is None:
                return out

    async def page(
        self,
        user_id: int,
        start_us: int,
        end_us: int,
        kinds: Collection[int] | None = None,
        *,
        device_ids: Collection[str] | None = None,
        after: Cursor | None = None,
        limit: int = 200,
    ) -> tuple[list[StoredEvent], Cursor | None]:
        """Up to limit events after the cursor, and the cursor of the next page (None at the end)."""
        sql = [
            "SELECT e.t_us, e.device_pk, e.seq, e.kind, e.body, d.device_id, d.kind"
            " FROM events e JOIN devices d ON d.device_pk = e.device_pk"
            " WHERE e.user_id = ? AND e.t_us >= ? AND e.t_us < ?"
        ]
        args: list[object] = [user_id, start_us, end_us]
        if after is not None:
            sql.append(" AND (e.t_us, e.device_pk, e.seq) > (?, ?, ?)")
            args += [after.t_us, after.device_pk, after.seq]
        if kinds:
            kind_list = sorted(set(kinds))
            sql.append(f" AND e.kind IN ({','.join('?' * len(kind_list))})")
            args += kind_list
        if device_ids:
            id_list = sorted(set(device_ids))
            sql.append(f" AND d.device_id IN ({','.join('?' * len(id_list))})")
            args += id_list
        sql.append(" ORDER BY e.t_us, e.device_pk, e.seq LIMIT ?")
        args.append(limit + 1)
        async with self._db.reader.execute("".join(sql), args) as c:
            rows = list(await c.fetchall())
        more = len(rows) > limit
        rows = rows[:limit]
        # Parsing a large page would hold the event loop for milliseconds: a worker does it.
        if len(rows) > INLINE_PARSE_ROWS:
            events = await asyncio.to_thread(_parse_page, rows)
        else:
            events = _parse_page(rows)
        if not more:
            return events, None
        last = rows[-1]
        return events, Cursor(int(last[0]), int(last[1]), int(last[2]))

    async def changes(
        self, user_id: int, after: ChangeCursor, limit: int
    ) -> tuple[list[StoredEvent], ChangeCursor, bool]:
        """Up to limit events committed after the cursor, in commit order; the cursor after
        them and whether the feed held nothing more at the time of the read."""
        async with self._db.reader.execute(
            "SELECT c.change_id, e.seq, e.t_us, e.kind, e.body, d.device_id, d.kind"
            " FROM event_changes c"
            " JOIN events e ON e.device_pk = c.device_pk AND e.seq BETWEEN c.seq_low AND c.seq_high"
            " JOIN devices d ON d.device_pk = c.device_pk"
            " WHERE c.user_id = ? AND (c.change_id, e.seq) > (?, ?)"
            " ORDER BY c.change_id, e.seq LIMIT ?",
            (user_id, after.change_id, after.seq, limit + 1),
        ) as c:
            rows = list(await c.fetchall())
        more = len(rows) > limit
        rows = rows[:limit]
        parse = events_pb2.Event.FromString
        events = [
            StoredEvent(str(device_id), int(dkind), int(seq), int(t_us), int(kind), parse(body))
            for _cid, seq, t_us, kind, body, device_id, dkind in rows
        ]
        if rows:
            after = ChangeCursor(int(rows[-1][0]), int(rows[-1][1]))
        return events, after, not more

    async def summarize(
        self, user_id: int, start_us: int, end_us: int, bucket_us: int
    ) -> list[ActivityBucket]:
        """Per-bucket steps, heart rate, HRV, app time and event counts over [start_us, end_us)."""
        if bucket_us <= 0 or end_us <= start_us:
            raise ValueError("need bucket_us > 0 and end_us > start_us")
        if (end_us - start_us) // bucket_us > MAX_SUMMARY_BUCKETS:
            raise ValueError(f"more than {MAX_SUMMARY_BUCKETS} buckets; use wider buckets")
        async with self._db.reader.execute(
            "SELECT (t_us - ?) / ?, count(*) FROM events"
            " WHERE user_id = ? AND t_us >= ? AND t_us < ? GROUP BY 1",
            (start_us, bucket_us, user_id, start_us, end_us),
        ) as c:
            counts = {int(b): int(n) for b, n in await c.fetchall()}
        relevant = await self.events(user_id, start_us, end_us, kinds=SUMMARY_KINDS)
        return summarize_events(relevant, start_us, end_us, bucket_us, counts)

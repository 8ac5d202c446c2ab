"""PostgreSQL implementation of the timeline read seam (pages, change feed, counts, watermark).

The write side is `PostgresEventWriter` (server/storage/postgres/events.py). Every query names
the person first, so on a table sharded by person (docs/scaling.md) it runs on one shard.
"""

from __future__ import annotations

from collections.abc import Collection

from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.server.storage.timeline import (
    ChangeCursor,
    Cursor,
    StoredEvent,
    UploadState,
    page_events,
)
from pulsesync.v1 import events_pb2


class PostgresTimelineStorage:
    def __init__(self, pool: PostgresPool) -> None:
        self._pool = pool

    async def page(
        self,
        user_id: int,
        start_us: int,
        end_us: int,
        kinds: Collection[int] | None,
        device_ids: Collection[str] | None,
        after: Cursor | None,
        limit: int,
    ) -> tuple[list[StoredEvent], Cursor | None]:
        sql = [
            "SELECT e.t_us, e.device_pk, e.seq, e.kind, e.body, d.device_id, d.kind"
            " FROM events e JOIN devices d ON d.user_id = e.user_id AND d.device_pk = e.device_pk"
            " WHERE e.user_id = $1 AND e.t_us >= $2 AND e.t_us < $3"
        ]
        args: list[object] = [user_id, start_us, end_us]
        if after is not None:
            n = len(args)
            sql.append(f" AND (e.t_us, e.device_pk, e.seq) > (${n + 1}, ${n + 2}, ${n + 3})")
            args += [after.t_us, after.device_pk, after.seq]
        if kinds:
            sql.append(f" AND e.kind = ANY(${len(args) + 1}::integer[])")
            args.append(sorted(set(kinds)))
        if device_ids:
            sql.append(f" AND d.device_id = ANY(${len(args) + 1}::text[])")
            args.append(sorted(set(device_ids)))
        sql.append(f" ORDER BY e.t_us, e.device_pk, e.seq LIMIT ${len(args) + 1}")
        args.append(limit + 1)
        rows = await self._pool.fetch("".join(sql), *args)
        more = len(rows) > limit
        rows = rows[:limit]
        events = await page_events(rows)
        if not more:
            return events, None
        last = rows[-1]
        return events, Cursor(int(last[0]), int(last[1]), int(last[2]))

    async def changes(
        self, user_id: int, after: ChangeCursor, limit: int
    ) -> tuple[list[StoredEvent], ChangeCursor, bool]:
        # change_id counts per person in commit order (timeline_heads), so a reader never
        # sees a change without every earlier one of that person.
        rows = await self._pool.fetch(
            "SELECT c.change_id, e.seq, e.t_us, e.kind, e.body, d.device_id, d.kind"
            " FROM event_changes c"
            " JOIN events e ON e.user_id = c.user_id AND e.device_pk = c.device_pk"
            "  AND e.seq BETWEEN c.seq_low AND c.seq_high"
            " JOIN devices d ON d.user_id = c.user_id AND d.device_pk = c.device_pk"
            " WHERE c.user_id = $1 AND (c.change_id, e.seq) > ($2, $3)"
            " ORDER BY c.change_id, e.seq LIMIT $4",
            user_id,
            after.change_id,
            after.seq,
            limit + 1,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        parse = events_pb2.Event.FromString
        events = [
            StoredEvent(str(r[5]), int(r[6]), int(r[1]), int(r[2]), int(r[3]), parse(r[4]))
            for r in rows
        ]
        if rows:
            after = ChangeCursor(int(rows[-1][0]), int(rows[-1][1]))
        return events, after, not more

    async def bucket_counts(
        self, user_id: int, start_us: int, end_us: int, bucket_us: int
    ) -> dict[int, int]:
        # SQLite's integer division truncates toward zero; t_us >= start_us keeps it
        # non-negative here, where PostgreSQL's bigint division does the same.
        rows = await self._pool.fetch(
            "SELECT (t_us - $1) / $2, count(*) FROM events"
            " WHERE user_id = $3 AND t_us >= $1 AND t_us < $4 GROUP BY 1",
            start_us,
            bucket_us,
            user_id,
            end_us,
        )
        return {int(b): int(n) for b, n in rows}

    async def upload_state(self, user_id: int, device_pk: int) -> UploadState:
        # The mark is the contiguous watermark an upload ack reports; the ingest writer
        # advances it in the same transaction as the rows it covers.
        rows = await self._pool.fetch(
            "SELECT ack_watermark, greatest("
            " (SELECT max(received_us) FROM events WHERE user_id = $1 AND device_pk = $2),"
            " (SELECT max(received_us) FROM quarantine WHERE user_id = $1 AND device_pk = $2))"
            " FROM devices WHERE user_id = $1 AND device_pk = $2",
            user_id,
            device_pk,
        )
        if not rows:
            return UploadState(0, None)
        row = rows[0]
        last = None if row[1] is None else int(row[1])
        return UploadState(int(row[0] or 0), last)

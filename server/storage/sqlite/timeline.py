"""SQLite implementation of the timeline read seam (the read connection only)."""

from __future__ import annotations

from collections.abc import Collection

from pulsesync.server.storage.db import Database
from pulsesync.server.storage.timeline import (
    ChangeCursor,
    Cursor,
    StoredEvent,
    UploadState,
    page_events,
)
from pulsesync.v1 import events_pb2


class SqliteTimelineStorage:
    def __init__(self, db: Database) -> None:
        self._db = db

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
        events = await page_events(rows)
        if not more:
            return events, None
        last = rows[-1]
        return events, Cursor(int(last[0]), int(last[1]), int(last[2]))

    async def changes(
        self, user_id: int, after: ChangeCursor, limit: int
    ) -> tuple[list[StoredEvent], ChangeCursor, bool]:
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

    async def bucket_counts(
        self, user_id: int, start_us: int, end_us: int, bucket_us: int
    ) -> dict[int, int]:
        async with self._db.reader.execute(
            "SELECT (t_us - ?) / ?, count(*) FROM events"
            " WHERE user_id = ? AND t_us >= ? AND t_us < ? GROUP BY 1",
            (start_us, bucket_us, user_id, start_us, end_us),
        ) as c:
            return {int(b): int(n) for b, n in await c.fetchall()}

    async def upload_state(self, user_id: int, device_pk: int) -> UploadState:
        # The mark is the contiguous watermark an upload ack reports: every seq at or below
        # it is stored, quarantined or refused for good. The ingest writer advances it in the
        # same transaction as the rows it covers (see committer.Watermark).
        async with self._db.reader.execute(
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

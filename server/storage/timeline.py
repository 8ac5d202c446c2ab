"""The timeline's read seam: pages of a person's merged events, the change feed, per-bucket event
counts and a device's upload watermark. The write side is the ingest writer process
(`pulsesync.server.timeline.writer`), the SQLite event writer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from pulsesync.v1 import events_pb2


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


@dataclass(frozen=True, slots=True, order=True)
class ChangeCursor:
    """A position in the change feed: after the event (change_id, seq); (0, 0) is the start."""

    change_id: int
    seq: int


@dataclass(frozen=True, slots=True)
class UploadState:
    """The server's watermark for one device."""

    acked_through_seq: int  # every seq at or below is handled for good; 0 when none is
    last_commit_us: int | None  # receive time of the device's latest committed event


class TimelineStorage(Protocol):
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
        """Up to limit events in [start, end) after the cursor in timeline order, and the
        cursor of the next page (None at the end)."""
        ...

    async def changes(
        self, user_id: int, after: ChangeCursor, limit: int
    ) -> tuple[list[StoredEvent], ChangeCursor, bool]:
        """Up to limit events committed after the cursor, in commit order; the cursor after
        them and whether the feed held nothing more at the time of the read."""
        ...

    async def bucket_counts(
        self, user_id: int, start_us: int, end_us: int, bucket_us: int
    ) -> dict[int, int]:
        """Events per bucket index ((t - start) // bucket) in [start, end)."""
        ...

    async def upload_state(self, user_id: int, device_pk: int) -> UploadState:
        """The device's acked-through mark and last commit time, from what is stored."""
        ...


# Rows a page parses on the event loop; a larger page is parsed in a worker thread.
INLINE_PARSE_ROWS: Final = 100


def _parse_page(rows: Sequence[Any]) -> list[StoredEvent]:
    """The events of page rows (t_us, device_pk, seq, kind, body, device_id, device_kind)."""
    parse = events_pb2.Event.FromString
    return [
        StoredEvent(str(r[5]), int(r[6]), int(r[2]), int(r[0]), int(r[3]), parse(r[4]))
        for r in rows
    ]


async def page_events(rows: Sequence[Any]) -> list[StoredEvent]:
    """The events of a page's rows (as _parse_page reads them), either backend's rows.
    Parsing a large page would hold the event loop for milliseconds: a worker does it."""
    if len(rows) > INLINE_PARSE_ROWS:
        return await asyncio.to_thread(_parse_page, rows)
    return _parse_page(rows)

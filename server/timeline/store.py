"""Reading the merged per-user timeline: the Python API other server components use.

    store = TimelineStore(storage.timeline)
    events = await store.events(user_id, start_us, end_us, kinds={EVENT_KIND_STEPS})
    buckets = await store.summarize(user_id, start_us, end_us, bucket_us=US_PER_MIN)

Events come back in the timeline's order: corrected time, then device, then sequence number,
so late and out-of-order arrivals sit where they happened. Every query is scoped by user_id.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final

from pulsesync.server.storage.timeline import (
    ChangeCursor,
    Cursor,
    StoredEvent,
    TimelineStorage,
    UploadState,
)
from pulsesync.server.timeline.aggregates import SUMMARY_KINDS, ActivityBucket, summarize_events
from pulsesync.server.timeline.steps import event_span

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


class TimelineStore:
    """Read access to stored events (see the module docstring)."""

    def __init__(self, storage: TimelineStorage) -> None:
        self._storage = storage

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
        return await self._storage.page(user_id, start_us, end_us, kinds, device_ids, after, limit)

    async def changes(
        self, user_id: int, after: ChangeCursor, limit: int
    ) -> tuple[list[StoredEvent], ChangeCursor, bool]:
        """Up to limit events committed after the cursor, in commit order; the cursor after
        them and whether the feed held nothing more at the time of the read."""
        return await self._storage.changes(user_id, after, limit)

    async def upload_state(self, user_id: int, device_pk: int) -> UploadState:
        """The device's acked-through mark and last commit time (what an upload ack reports)."""
        return await self._storage.upload_state(user_id, device_pk)

    async def summarize(
        self, user_id: int, start_us: int, end_us: int, bucket_us: int
    ) -> list[ActivityBucket]:
        """Per-bucket steps, heart rate, HRV, app time and event counts over [start_us, end_us)."""
        if bucket_us <= 0 or end_us <= start_us:
            raise ValueError("need bucket_us > 0 and end_us > start_us")
        if (end_us - start_us) // bucket_us > MAX_SUMMARY_BUCKETS:
            raise ValueError(f"more than {MAX_SUMMARY_BUCKETS} buckets; use wider buckets")
        counts = await self._storage.bucket_counts(user_id, start_us, end_us, bucket_us)
        # Steps near the ends may count in the range's minutes (timeline/steps.py).
        lo, hi = event_span(start_us, end_us)
        relevant = await self.events(
            user_id, min(lo, start_us), max(hi, end_us), kinds=SUMMARY_KINDS
        )
        return summarize_events(relevant, start_us, end_us, bucket_us, counts)

"""Ingest's event writer on PostgreSQL: `PostgresEventWriter` behind the `EventWriter` seam.

The SQLite writer process answers each batch with an `Outcome` and runs the commit hook on the
inserted rows in its own process; here the commit runs on the server's event loop (asyncpg does
its I/O there and PostgreSQL does the work in its own processes), so the hook runs right after
the commit, on the loop, before the batch's future resolves: what reaches the event bus is the
same on both backends.

A device's batches commit in the order they arrived. PostgresEventWriter runs several
transactions at once, so two batches of one device could otherwise commit the wrong way round:
the later one's ack would carry a lower watermark than the earlier one's, and a replayed seq
would count as accepted in the later batch and duplicate in the earlier. So a batch waits
for the previous batch of its device to be answered before it is queued; batches of different
devices still share transactions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from pulsesync.server.storage.postgres.errors import storage_error
from pulsesync.server.storage.postgres.events import PostgresEventWriter, WriterClosed
from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.server.timeline import committer
from pulsesync.server.timeline.committer import Stored
from pulsesync.server.timeline.writer import Conflict, Outcome, PendingBatch
from pulsesync.server.timeline.writer import WriterClosed as IngestWriterClosed

log = logging.getLogger(__name__)


class PostgresIngestWriter:
    """`EventWriter` over PostgreSQL (group commit, binary COPY; see postgres/events.py)."""

    def __init__(
        self,
        pool: PostgresPool,
        commit_hook: str = "",
        on_commits: Callable[[int], None] | None = None,
    ) -> None:
        self._inner = PostgresEventWriter(pool)
        self._hook = committer.load_hook(commit_hook)
        self._on_commits = on_commits
        self._commits_seen = 0
        # device_pk -> the latest batch of that device not yet answered.
        self._last: dict[int, asyncio.Future[Outcome]] = {}

    @property
    def commits(self) -> int:
        """Transactions committed so far."""
        return self._inner.commits

    async def start(self) -> None:
        await self._inner.start()

    async def stop(self) -> None:
        await self._inner.stop()

    def submit(self, batch: PendingBatch) -> asyncio.Future[Outcome]:
        previous = self._last.get(batch.device_pk)
        self._last[batch.device_pk] = batch.future
        batch.future.add_done_callback(lambda f: self._answered(batch.device_pk, f))
        if previous is None or previous.done():
            self._queue(batch)
        else:
            previous.add_done_callback(lambda _: self._queue(batch))
        return batch.future

    def _queue(self, batch: PendingBatch) -> None:
        stored = self._inner.submit(batch)
        stored.add_done_callback(lambda f: self._resolve(batch, f))

    def _answered(self, device_pk: int, future: asyncio.Future[Outcome]) -> None:
        if self._last.get(device_pk) is future:
            del self._last[device_pk]

    def forget_device(self, device_pk: int) -> None:
        self._inner.forget_device(device_pk)

    def _resolve(self, batch: PendingBatch, stored: asyncio.Future[Stored]) -> None:
        if self._on_commits is not None and self._inner.commits > self._commits_seen:
            self._on_commits(self._inner.commits - self._commits_seen)
            self._commits_seen = self._inner.commits
        if batch.future.done():
            return
        if stored.cancelled():
            batch.future.set_exception(IngestWriterClosed("the ingest writer stopped; resend"))
            return
        error = stored.exception()
        if error is not None:
            if isinstance(error, WriterClosed):
                error = IngestWriterClosed(str(error))
            else:
                # A full disk or a lost database is told as such (STORAGE_FULL,
                # STORAGE_UNAVAILABLE); another failure is ingest's to answer.
                error = storage_error(error) or error
            batch.future.set_exception(error)
            return
        result = stored.result()
        rows = batch.rows if result.inserted is None else [batch.rows[i] for i in result.inserted]
        derived = None
        if self._hook is not None:
            try:
                derived = self._hook(rows, batch.device_pk)
            except Exception:
                log.exception(
                    "the commit hook failed on a batch", extra={"device": batch.device_pk}
                )
        batch.future.set_result(
            Outcome(
                rows,
                result.duplicates,
                [Conflict(*c) for c in result.conflicts],
                derived,
                result.watermark,
            )
        )

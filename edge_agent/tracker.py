"""The Tracker SDK: what an app calls to record behavior, without ever blocking.

    tracker = Tracker(outbox, SyncedConsent(...))   # no consent given: nothing is recorded
    await tracker.start()
    tracker.screen_view("study", "deck/12", dwell=14.2)   # from any thread
    ...
    await tracker.close()                                   # flushes to the outbox

Every recording method is synchronous, thread-safe and returns at once: it checks consent (a
category the person has not granted is dropped right there, counted, nothing built), stamps
the device time and appends to an in-memory queue. A flusher task moves the queue to the
outbox in batches (after a short linger, or as soon as a batch is full), one transaction each.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from pulsesync.edge_agent.clock import Clock, SystemClock
from pulsesync.edge_agent.config import (
    DEFAULT_TRACKER_LINGER_S,
    DEFAULT_TRACKER_MAX_BATCH,
    DEFAULT_TRACKER_MAX_QUEUE,
)
from pulsesync.edge_agent.consent import ConsentView, StaticConsent
from pulsesync.edge_agent.errors import OutboxError
from pulsesync.edge_agent.outbox import Outbox
from pulsesync.kinds import category_of
from pulsesync.v1 import common_pb2, events_pb2

log = logging.getLogger(__name__)

_BEHAVIOR: Final = common_pb2.CONSENT_CATEGORY_BEHAVIOR
# After a failed outbox write (disk full, I/O error) the flusher keeps the events in memory
# and retries this often: quick enough to recover, slow enough not to spin on a dead disk.
_RETRY_WRITE_S: Final = 1.0
# A failing disk is reported once at once, then reminded of this often (not once per retry):
# the person needs to know, but a log line per second would bury everything else.
_REMIND_WRITE_FAILURE_S: Final = 300.0

Seconds = float | timedelta


def _set_duration(field: object, value: Seconds) -> None:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    field.FromMicroseconds(max(0, round(seconds * 1e6)))  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class TrackerStats:
    """Counters since start: recorded (queued), written to the outbox, dropped, still queued."""

    recorded: int
    written: int
    dropped_no_consent: int
    dropped_overflow: int
    queued: int


class Tracker:
    """Records app events into an Outbox; implements pulsesync.edge_agent.sink.EventSink."""

    def __init__(
        self,
        outbox: Outbox,
        consent: ConsentView | None = None,
        *,
        clock: Clock | None = None,
        linger_s: float = DEFAULT_TRACKER_LINGER_S,
        max_batch: int = DEFAULT_TRACKER_MAX_BATCH,
        max_queue: int = DEFAULT_TRACKER_MAX_QUEUE,
        monotonic_ns: Callable[[], int] | None = None,
    ) -> None:
        self.outbox = outbox
        # Default deny: without a consent view, no category is granted (as the consent module promises).
        self.consent: ConsentView = consent if consent is not None else StaticConsent(())
        self.clock: Clock = clock or SystemClock()
        # Must be the outbox's monotonic clock: the outbox keeps these readings to give each
        # event its true age at send time, whatever happens to the wall clock meanwhile.
        self.monotonic_ns: Callable[[], int] = monotonic_ns or outbox.monotonic_ns
        self.linger_s = linger_s
        self.max_batch = max_batch
        self.max_queue = max_queue
        # (event, monotonic reading at its device time)
        self._queue: collections.deque[tuple[events_pb2.Event, int]] = collections.deque()
        self._lock = threading.Lock()
        self._write_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._wake = asyncio.Event()  # the queue went from empty to non-empty
        self._full = asyncio.Event()  # the queue holds a full batch
        self._task: asyncio.Task[None] | None = None
        self._recorded = self._written = self._no_consent = self._overflow = 0
        self._failing_since: float | None = None  # loop time of the first failed write
        self._reminded_at = 0.0

    # -- lifetime ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the flusher on the running event loop."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if self._queue:
            self._wake.set()
        self._task = asyncio.create_task(self._flusher(), name="tracker-flusher")

    async def flush(self) -> None:
        """Write everything recorded so far to the outbox (durably) before returning.

        Raises OutboxFull when the disk is full and OutboxError when the outbox cannot be
        written; the events stay queued in memory and the flusher keeps retrying."""
        async with self._write_lock:
            while batch := self._take(self.max_batch):
                await self._append(batch)

    async def close(self) -> None:
        """Stop the flusher and flush what is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def __aenter__(self) -> Tracker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def stats(self) -> TrackerStats:
        """A snapshot of the counters."""
        with self._lock:
            return TrackerStats(
                self._recorded, self._written, self._no_consent, self._overflow, len(self._queue)
            )

    async def record_durable(self, event: events_pb2.Event) -> None:
        """Record an event and return only once it is committed to the outbox (fsynced), so a
        crash after this returns cannot lose it. Raises like `flush`."""
        self.record(event)
        await self.flush()

    # -- recording (any thread, never blocks) ------------------------------------------------
    def record(self, event: events_pb2.Event) -> None:
        """Queue an event (the Tracker owns it from now on; do not modify it afterwards)."""
        if not self.consent.allows(category_of(event)):
            self._dropped_for_consent()
            return
        if not event.HasField("device_time"):
            event.device_time.FromMicroseconds(self.clock.now_us())
        event.seq = 0  # the outbox assigns it; zero marks "not yet committed"
        self._enqueue(event)

    def screen_view(
        self, app: str, screen: str, dwell: Seconds, *, at_us: int | None = None
    ) -> None:
        """The person left `screen` of `app` after looking at it for `dwell` (seconds)."""
        if not self.consent.allows(_BEHAVIOR):
            self._dropped_for_consent()
            return
        event = self._new(at_us)
        event.screen_view.app, event.screen_view.screen = app, screen
        _set_duration(event.screen_view.dwell, dwell)
        self._enqueue(event)

    def tap(self, app: str, screen: str, target: str, *, at_us: int | None = None) -> None:
        """The person tapped control `target` on `screen`."""
        if not self.consent.allows(_BEHAVIOR):
            self._dropped_for_consent()
            return
        event = self._new(at_us)
        event.tap.app, event.tap.screen, event.tap.target = app, screen, target
        self._enqueue(event)

    def feature_use(
        self, app: str, feature: str, duration: Seconds = 0.0, *, at_us: int | None = None
    ) -> None:
        """The person used `feature` (a stable name, e.g. "flashcards") for `duration`."""
        if not self.consent.allows(_BEHAVIOR):
            self._dropped_for_consent()
            return
        event = self._new(at_us)
        event.feature_use.app, event.feature_use.feature = app, feature
        _set_duration(event.feature_use.duration, duration)
        self._enqueue(event)

    def search(
        self, app: str, query: str, result_count: int = 0, *, at_us: int | None = None
    ) -> None:
        """The person searched `query` in `app` and got `result_count` results."""
        if not self.consent.allows(_BEHAVIOR):
            self._dropped_for_consent()
            return
        event = self._new(at_us)
        event.search.app, event.search.query = app, query
        event.search.result_count = result_count
        self._enqueue(event)

    def session_start(
        self, app: str, session_id: str | None = None, *, at_us: int | None = None
    ) -> str:
        """An app session began; returns its id (generated when not given)."""
        session_id = session_id or uuid.uuid4().hex
        if not self.consent.allows(_BEHAVIOR):
            self._dropped_for_consent()
            return session_id
        event = self._new(at_us)
        event.session_start.app, event.session_start.session_id = app, session_id
        self._enqueue(event)
        return session_id

    def session_end(
        self, app: str, session_id: str, duration: Seconds, *, at_us: int | None = None
    ) -> None:
        """The app session `session_id` ended after `duration`."""
        if not self.consent.allows(_BEHAVIOR):
            self._dropped_for_consent()
            return
        event = self._new(at_us)
        event.session_end.app, event.session_end.session_id = app, session_id
        _set_duration(event.session_end.duration, duration)
        self._enqueue(event)

    # -- internals --------------------------------------------------------------------------
    def _new(self, at_us: int | None) -> events_pb2.Event:
        event = events_pb2.Event()
        event.device_time.FromMicroseconds(self.clock.now_us() if at_us is None else at_us)
        return event

    def _dropped_for_consent(self) -> None:
        with self._lock:
            self._no_consent += 1

    def _enqueue(self, event: events_pb2.Event) -> None:
        age_us = self.clock.now_us() - event.device_time.ToMicroseconds()
        mono = self.monotonic_ns() - max(0, age_us) * 1000
        with self._lock:
            n = len(self._queue)
            if n >= self.max_queue:
                self._overflow += 1
                if self._overflow == 1 or self._overflow % 10_000 == 0:
                    log.warning(
                        "tracker queue full: dropping events (is the disk stalled?)",
                        extra={"dropped": self._overflow, "max_queue": self.max_queue},
                    )
                return
            self._queue.append((event, mono))
            self._recorded += 1
        if n == 0:
            self._signal(self._wake)
        if n + 1 == self.max_batch:
            self._signal(self._full)

    def _signal(self, ev: asyncio.Event) -> None:
        loop = self._loop
        if loop is None:  # not started yet: start() looks at the queue
            return
        if threading.get_ident() == self._loop_thread:
            ev.set()
        else:
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                loop.call_soon_threadsafe(ev.set)

    def _take(self, limit: int) -> list[tuple[events_pb2.Event, int]]:
        with self._lock:
            n = min(limit, len(self._queue))
            return [self._queue.popleft() for _ in range(n)]

    async def _append(self, batch: list[tuple[events_pb2.Event, int]]) -> None:
        try:
            await self.outbox.append([e for e, _ in batch], mono_ns=[m for _, m in batch])
        except BaseException:
            if batch[0][0].seq == 0:  # not committed (a committed batch has its seqs set)
                with self._lock:  # keep them, in order, for the next attempt
                    self._queue.extendleft(reversed(batch))
            else:
                with self._lock:
                    self._written += len(batch)
            raise
        with self._lock:
            self._written += len(batch)

    async def _flusher(self) -> None:
        while True:
            await self._wake.wait()
            if self.linger_s > 0 and len(self._queue) < self.max_batch:
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.linger_s):
                        await self._full.wait()
            try:
                async with self._write_lock:
                    while batch := self._take(self.max_batch):
                        await self._append(batch)
                        if len(self._queue) < self.max_batch:
                            break  # a partial batch lingers again
            except Exception as e:
                self._write_failed(e)
                await asyncio.sleep(_RETRY_WRITE_S)
            else:
                if self._failing_since is not None:
                    log.warning("the outbox is writable again; queued events were written")
                    self._failing_since = None
            with self._lock:
                if not self._queue:
                    self._wake.clear()

    def _write_failed(self, e: Exception) -> None:
        """Report a failed outbox write: once at once, then a reminder every few minutes."""
        now = asyncio.get_running_loop().time()
        first = self._failing_since is None
        if first:
            self._failing_since = now
        elif now - self._reminded_at < _REMIND_WRITE_FAILURE_S:
            return
        self._reminded_at = now
        queued = len(self._queue)
        if isinstance(e, OutboxError):  # expected and explained: no traceback
            log.warning(
                "%s%s; %d events wait in memory (at most %d are kept, newer ones are dropped)",
                "" if first else "still failing: ",
                e,
                queued,
                self.max_queue,
            )
        else:
            log.exception("writing to the outbox failed; keeping events and retrying")

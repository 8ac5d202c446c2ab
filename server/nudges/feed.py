"""The nudge feature feed: committed events queued off the ingest path and folded into the
features of people who consent to personalization; nudge feedback uploaded as events recorded.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from pulsesync.server.bus import CommittedBatch, CommittedEvent
from pulsesync.server.nudges.features import FeatureStore
from pulsesync.server.privacy.consent import ConsentStore
from pulsesync.v1 import common_pb2, events_pb2

log = logging.getLogger(__name__)

# Committed events queued for the features before a fold starts without waiting for the
# tick: heavy ingest would otherwise queue 15 s of it (about a gigabyte at 300k events/s).
FOLD_BACKLOG_EVENTS: Final = 50_000
# Committed events that carry nudge feedback (recorded like RecordNudgeFeedback).
_INTERACTION: Final = frozenset({events_pb2.EVENT_KIND_NUDGE_INTERACTION})

# record(user_id, nudge_id, device_pk, action, action_us, received_us) -> recorded
RecordFeedback = Callable[[int, str, int, int, int, int], Awaitable[bool]]


class FeatureFeed:
    """Bus subscriber feeding the nudge features (see the module docstring)."""

    def __init__(
        self,
        features: FeatureStore,
        consent: ConsentStore,
        record_feedback: RecordFeedback,
        on_withdrawn: Callable[[int], None],
    ) -> None:
        self._features = features
        self._consent = consent
        self._record_feedback = record_feedback
        self._on_withdrawn = on_withdrawn
        self._pending: deque[tuple[int, Sequence[CommittedEvent]]] = deque()
        self._pending_events = 0
        self._fold_lock = asyncio.Lock()  # one fold at a time, so batches fold in order
        self._backlog_fold: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._consenting: dict[int, bool] = {}
        self._unwatch: dict[int, Callable[[], None]] = {}

    def close(self) -> None:
        for cancel in self._unwatch.values():
            cancel()
        if self._backlog_fold is not None:
            self._backlog_fold.cancel()
        for task in self._tasks:
            task.cancel()

    def on_events(self, user_id: int, events: Sequence[CommittedEvent]) -> None:
        """Bus subscriber. On the ingest path: only queue; the tick folds them in, or a fold
        of its own starts when heavy ingest queues more than FOLD_BACKLOG_EVENTS first."""
        self._pending.append((user_id, events))
        self._pending_events += len(events)
        interactions = (
            list(events.of_kinds(_INTERACTION))
            if isinstance(events, CommittedBatch)
            else [e for e in events if e.kind in _INTERACTION]
        )
        if interactions:  # feedback uploaded as events: recorded now, not at the next tick
            task = asyncio.get_running_loop().create_task(
                self._record_interactions(user_id, interactions), name="nudge-feedback-events"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._pending_events >= FOLD_BACKLOG_EVENTS and self._backlog_fold is None:
            self._backlog_fold = asyncio.get_running_loop().create_task(
                self._fold_backlog(), name="nudge-feature-fold"
            )

    async def _fold_backlog(self) -> None:
        try:
            await self.flush()
        except Exception:
            log.exception("folding queued events into the nudge features failed")
        finally:
            self._backlog_fold = None

    async def _record_interactions(self, user_id: int, events: Sequence[CommittedEvent]) -> None:
        try:
            for e in events:
                ev = events_pb2.Event.FromString(e.body)
                p = ev.nudge_interaction
                await self._record_feedback(
                    user_id, p.nudge_id, e.device_pk, int(p.action), e.t_us, e.received_us or e.t_us
                )
        except Exception:
            log.exception("recording nudge feedback from interaction events failed")

    async def settled(self) -> None:
        """Wait until feedback from interaction events is recorded."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def pending_events(self) -> int:
        """Committed events queued for the next fold into the features."""
        return self._pending_events

    async def flush(self) -> None:
        """Fold queued committed events into the features of consenting users."""
        async with self._fold_lock:
            while self._pending:
                user_id, events = self._pending.popleft()
                self._pending_events -= len(events)
                if await self._consents(user_id):
                    self._features.apply(user_id, events)
                # Under heavy ingest many batches are queued: let the event loop serve
                # streams between them instead of stalling every ack.
                await asyncio.sleep(0)

    async def _consents(self, user_id: int) -> bool:
        known = self._consenting.get(user_id)
        if known is None:
            granted = await self._consent.granted(user_id)
            known = common_pb2.CONSENT_CATEGORY_PERSONALIZATION in granted
            self._consenting[user_id] = known
            if user_id not in self._unwatch:
                self._unwatch[user_id] = self._consent.watch(user_id, self._on_consent)
        return known

    def _on_consent(self, user_id: int, states: Any) -> None:
        ok = any(
            s.category == common_pb2.CONSENT_CATEGORY_PERSONALIZATION and s.granted for s in states
        )
        self._consenting[user_id] = ok
        if not ok:
            self._features.forget(user_id)
            self._on_withdrawn(user_id)

    def forget_user(self, user_id: int) -> None:
        self._features.forget(user_id)
        self._consenting.pop(user_id, None)
        cancel = self._unwatch.pop(user_id, None)
        if cancel:
            cancel()

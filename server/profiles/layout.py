"""Adaptive layout: rank each person's features by recency-weighted use across devices.

Every committed FEATURE_USE (the feature) and SCREEN_VIEW (the screen) event adds to the
feature's score, and scores decay exponentially with a half-life of `HALF_LIFE_US` (7 days):
what someone used this week outranks what they used a lot a month ago, yet one busy day does
not erase a habit. The ranked order is published in the profile's `layout.usage_ranking`
(stamped by the server, so it merges like any field) when it changes; apps show
`layout.feature_order`, which is the person's `pinned_order` when they set one.

The bus subscriber only queues events (it runs on the ingest path); a background task
updates scores, persists them and commits new rankings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from pulsesync.server.bus import CommittedBatch, CommittedEvent
from pulsesync.server.privacy.consent import ConsentStore
from pulsesync.server.storage.profiles import ProfileStorage
from pulsesync.v1 import common_pb2, events_pb2, profiles_pb2

if TYPE_CHECKING:
    from pulsesync.server.profiles.store import ProfileStore

log = logging.getLogger(__name__)

# A week: most routines (study days, workouts, weekend reading) repeat weekly, so a feature
# used once a week keeps half its weight until it is used again.
HALF_LIFE_US: Final = 7 * 24 * 3600 * 1_000_000
# Using a feature is a stronger signal than passing through its screen.
FEATURE_USE_WEIGHT: Final = 1.0
SCREEN_VIEW_WEIGHT: Final = 0.5
# Apps show a handful of features up front; 32 covers any navigation bar or home grid.
MAX_RANKED: Final = 32
# Scores kept per person; the weakest beyond this are dropped (they would rank last anyway).
MAX_TRACKED: Final = 256
_USAGE_KINDS: Final = frozenset(
    {events_pb2.EVENT_KIND_FEATURE_USE, events_pb2.EVENT_KIND_SCREEN_VIEW}
)
# Usage is folded into the ranking at most this often (one write per person per interval).
COALESCE_SECONDS: Final = 0.5


def decay(score: float, elapsed_us: int) -> float:
    """score after elapsed_us of exponential decay with half-life HALF_LIFE_US."""
    return score * math.pow(2.0, -elapsed_us / HALF_LIFE_US)


def add_use(current: tuple[float, int] | None, weight: float, t_us: int) -> tuple[float, int]:
    """A (score, ref_us) pair after one use of weight at t_us (events may come late)."""
    if current is None:
        return weight, t_us
    score, ref = current
    if t_us >= ref:
        return decay(score, t_us - ref) + weight, t_us
    return score + decay(weight, ref - t_us), ref


def rank(scores: dict[str, tuple[float, int]], limit: int = MAX_RANKED) -> list[str]:
    """Features by decayed score at a common time, best first (ties by name)."""
    if not scores:
        return []
    now = max(ref for _, ref in scores.values())
    decayed = {f: decay(s, now - ref) for f, (s, ref) in scores.items()}
    return sorted(decayed, key=lambda f: (-decayed[f], f))[:limit]


def use_of(event: CommittedEvent) -> tuple[str, float] | None:
    """The feature an event counts towards and its weight, if it is a usage event."""
    if event.kind == events_pb2.EVENT_KIND_FEATURE_USE:
        name = events_pb2.Event.FromString(event.body).feature_use.feature
        return (name, FEATURE_USE_WEIGHT) if name else None
    if event.kind == events_pb2.EVENT_KIND_SCREEN_VIEW:
        name = events_pb2.Event.FromString(event.body).screen_view.screen
        return (name, SCREEN_VIEW_WEIGHT) if name else None
    return None


class UsageRanker:
    """Keeps usage scores per person and publishes the ranking into their profile."""

    def __init__(self, store: ProfileStore, storage: ProfileStorage, consent: ConsentStore) -> None:
        self._store = store
        self._storage = storage
        self._consent = consent
        self._pending: list[tuple[int, str, float, int]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._scores: dict[int, dict[str, tuple[float, int]]] = {}
        self._task: asyncio.Task[None] | None = None

    def on_events(self, user_id: int, events: Sequence[CommittedEvent]) -> None:
        """Bus subscriber: queue the usage events of a committed batch (quick, never raises)."""
        usage = (
            events.of_kinds(_USAGE_KINDS)
            if isinstance(events, CommittedBatch)
            else (e for e in events if e.kind in _USAGE_KINDS)
        )
        for event in usage:
            try:
                use = use_of(event)
            except Exception:
                log.warning("unreadable usage event skipped", extra={"user_id": user_id})
                continue
            if use is not None:
                self._pending.append((user_id, use[0], use[1], event.t_us))
        if self._pending:
            self._idle.clear()
            self._wake.set()

    def start(self) -> None:
        """Run the background worker."""
        self._task = asyncio.create_task(self._run(), name="profile-usage-ranker")

    async def stop(self) -> None:
        """Stop the worker (pending uses are dropped; scores already stored stay)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def drain(self) -> None:
        """Wait until every queued use is scored and its ranking published."""
        await self._idle.wait()

    def forget_user(self, user_id: int) -> None:
        """Drop a person's cached scores and queued uses (after erasure)."""
        self._scores.pop(user_id, None)
        self._pending = [p for p in self._pending if p[0] != user_id]

    async def ranking(self, user_id: int) -> list[str]:
        """The current ranked features of a person."""
        return rank(await self._load(user_id))

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            # Gather a moment's worth of uses first: a busy ingest publishes hundreds of
            # batches a second, and one durable write per batch would queue every one of them
            # behind the database's write lock, slowing ingest for a ranking nobody reads
            # faster than this.
            await asyncio.sleep(COALESCE_SECONDS)
            self._wake.clear()
            batch, self._pending = self._pending, []
            by_user: dict[int, list[tuple[str, float, int]]] = defaultdict(list)
            for user_id, feature, weight, t_us in batch:
                by_user[user_id].append((feature, weight, t_us))
            for user_id, uses in by_user.items():
                try:
                    await self._apply(user_id, uses)
                except Exception:
                    log.exception("usage ranking update failed", extra={"user_id": user_id})
            if not self._pending:
                self._idle.set()

    async def _load(self, user_id: int) -> dict[str, tuple[float, int]]:
        scores = self._scores.get(user_id)
        if scores is None:
            scores = await self._storage.usage_scores(user_id)
            self._scores[user_id] = scores
        return scores

    async def _apply(self, user_id: int, uses: list[tuple[str, float, int]]) -> None:
        scores = dict(await self._load(user_id))
        for feature, weight, t_us in uses:
            scores[feature] = add_use(scores.get(feature), weight, t_us)
        dropped: list[str] = []
        if len(scores) > MAX_TRACKED:
            dropped = rank(scores, limit=len(scores))[MAX_TRACKED:]
            for feature in dropped:
                del scores[feature]
        touched = {f for f, _, _ in uses} - set(dropped)
        await self._storage.save_usage(user_id, {f: scores[f] for f in touched}, dropped)
        self._scores[user_id] = scores
        if common_pb2.CONSENT_CATEGORY_SYNC not in await self._consent.granted(user_id):
            return  # the profile is only kept and shared with the person's sync consent
        ranking = rank(scores)
        current = await self._store.get(user_id)
        if list(current.layout.usage_ranking) != ranking:

            def publish(p: profiles_pb2.Profile) -> None:
                p.layout.usage_ranking[:] = ranking

            await self._store.edit(user_id, publish)

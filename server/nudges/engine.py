"""The nudge loop on the server: decision points, eligibility, policy, delivery, outcomes.

    tick(now) ─► fold committed events into features ─► reload the model if promoted anew
             ─► for each tracked user: scheduled times passed since the last tick, or a long
                sedentary stretch ─► decide ─► log ─► queue on the device in use
             ─► expire undelivered nudges ─► compute outcomes whose window (+ grace) closed

`tick` runs from a background task every `TICK_SECONDS` of real time; simulations with a
fake clock call it themselves after moving the clock (the server's config extra
`nudges.scheduler = "manual"`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pulsesync.server.bus import CommittedBatch, CommittedEvent
from pulsesync.server.context import AppContext
from pulsesync.server.nudges.catalog import NONE_ACTION, Catalog, NudgeType, load_catalog
from pulsesync.server.nudges.eligibility import (
    Eligibility,
    NudgeProfile,
    Reachable,
    eligible,
    template_values,
)
from pulsesync.server.nudges.features import (
    FeatureStore,
    hour_bucket,
    local_day,
    local_time,
)
from pulsesync.server.nudges.model import OutcomeModel
from pulsesync.server.nudges.policy import COLD_START, choose
from pulsesync.server.nudges.profiles import ProfileSource, profile_source
from pulsesync.server.nudges.push import PushProvider, push_provider
from pulsesync.server.nudges.registry import ModelRegistry
from pulsesync.server.timeline.steps import steps_in_window
from pulsesync.server.timeline.store import TimelineStore
from pulsesync.timeutil import timestamp as _ts
from pulsesync.v1 import common_pb2, events_pb2, nudges_pb2

log = logging.getLogger(__name__)

# Real seconds between ticks: scheduled decisions land within this of their time.
TICK_SECONDS: Final = 15.0
# Nudge history kept in memory per user: enough for two days of caps and cooldowns.
HISTORY_US: Final = 48 * 3600 * 1_000_000
# A device stream holds at most this many undelivered nudges (caps make more impossible).
STREAM_QUEUE: Final = 32
# Committed events queued for the features before a fold starts without waiting for the
# tick: heavy ingest would otherwise queue 15 s of it (about a gigabyte at 300k events/s).
FOLD_BACKLOG_EVENTS: Final = 50_000
# An app that fetched pending nudges within this long counts as reachable by fetching: apps
# on a phone wake several times a day; one idle for a day would find its nudges expired.
FETCH_REACH_US: Final = 24 * 3600 * 1_000_000
# Committed events that carry nudge feedback (recorded like RecordNudgeFeedback).
_INTERACTION: Final = frozenset({events_pb2.EVENT_KIND_NUDGE_INTERACTION})


@dataclass(slots=True)
class _Stream:
    user_id: int
    device_id: str
    kind: int
    queue: asyncio.Queue[nudges_pb2.Nudge | None] = field(
        default_factory=lambda: asyncio.Queue(STREAM_QUEUE)
    )


@dataclass(frozen=True, slots=True)
class _Offline:
    """A device reachable without a stream: by push (token set) or by fetching when it wakes."""

    user_id: int
    device_id: str
    kind: int
    push_token: str  # "" for a device that only fetches
    seen_us: int  # when it registered or last fetched


@dataclass(frozen=True, slots=True)
class Decision:
    """What one decision point produced (for callers, tests and the bench)."""

    decision_id: int
    user_id: int
    decision_us: int
    eligibility: Eligibility
    probabilities: dict[str, float]
    chosen: str
    nudge: nudges_pb2.Nudge | None
    latency_s: float


def _reasons(t: NudgeType, ctx: Any, profile: NudgeProfile, now: int) -> list[str]:
    """Why this type was eligible and chosen now, in words about this nudge's own premise."""
    out: list[str] = []
    item = profile.continuity
    if t.needs_continuity_item and item is not None:
        out.append(f"{item.title!r} in {item.app} is {round(item.progress * 100)}% done")
        if item.position:
            out.append(f"left off at {item.position}")
    if t.near_habitual_feature:
        out.append(f"usual time for {t.near_habitual_feature}")
    if profile.daily_study_minutes and "{study_minutes_left}" in t.message:
        out.append(f"goal of {profile.daily_study_minutes} study minutes a day")
    if t.min_stress is not None:
        out.append(f"heart rate variability {ctx.stress:.0%} below usual")
    if t.activity:
        out.append(f"sedentary {int(ctx.sedentary_min)} min")
        out.append(f"{int(ctx.values['steps_30'])} steps in 30 min")
    if not out:
        out.append(f"eligible at local {local_time(now, profile.time_zone):%H:%M}")
    return out


class NudgeEngine:
    """Decides, delivers and measures nudges for every user of one server."""

    def __init__(
        self,
        app: AppContext,
        *,
        catalog: Catalog | None = None,
        profiles: ProfileSource | None = None,
        models_dir: Path | None = None,
        seed: int | None = None,
    ) -> None:
        self.app = app
        self.catalog = catalog or load_catalog(app.config.extra.get("nudge_catalog"))
        self.profiles: ProfileSource = profiles or profile_source(app, self.catalog.policy)
        self.registry = ModelRegistry(models_dir or app.config.data_dir / "nudge_models")
        self.features = FeatureStore(self.catalog.policy.active_window_us)
        self.timeline = TimelineStore(app.db)
        self.model: OutcomeModel | None = None
        self.rng = random.Random(seed if seed is not None else secrets.randbits(64))
        self.latencies: list[float] = []
        self._pending: deque[tuple[int, Sequence[CommittedEvent]]] = deque()
        self._pending_events = 0
        self._fold_lock = asyncio.Lock()  # one fold at a time, so batches fold in order
        self._backlog_fold: asyncio.Task[None] | None = None
        self._feedback_tasks: set[asyncio.Task[None]] = set()
        self._consenting: dict[int, bool] = {}
        self._unwatch: dict[int, Any] = {}
        self._last_tick: dict[int, int] = {}
        self._trigger_stretch: dict[int, int] = {}
        self._history: dict[int, list[tuple[str, int]]] = {}
        self._streams: dict[int, _Stream] = {}
        self._device_kinds: dict[int, int] = {}
        # Devices without a stream that still take nudges: push targets (from the database)
        # and apps that fetched pending nudges within the active window (this replica).
        self._offline: dict[int, _Offline] = {}
        self._push_loaded = False
        self.push: PushProvider | None = push_provider(app.config.extra)
        self._unsubscribe = app.bus.subscribe(self._on_events)
        app.user_data.on_erase("nudges", self._erase)
        self._habitual = tuple(
            t.near_habitual_feature for t in self.catalog.types if t.near_habitual_feature
        )

    def close(self) -> None:
        self._unsubscribe()
        for cancel in self._unwatch.values():
            cancel()
        if self._backlog_fold is not None:
            self._backlog_fold.cancel()
        for task in self._feedback_tasks:
            task.cancel()

    # -- events ---------------------------------------------------------------------------
    def _on_events(self, user_id: int, events: Sequence[CommittedEvent]) -> None:
        # On the ingest path: only queue; the tick folds them in, or a fold of its own starts
        # when heavy ingest queues more than FOLD_BACKLOG_EVENTS before the next tick.
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
            self._feedback_tasks.add(task)
            task.add_done_callback(self._feedback_tasks.discard)
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
                await self.record_feedback(
                    user_id, p.nudge_id, e.device_pk, int(p.action), e.t_us, e.received_us or e.t_us
                )
        except Exception:
            log.exception("recording nudge feedback from interaction events failed")

    async def feedback_settled(self) -> None:
        """Wait until feedback from interaction events is recorded and pushes are done."""
        while self._feedback_tasks:
            await asyncio.gather(*self._feedback_tasks, return_exceptions=True)

    async def record_feedback(
        self,
        user_id: int,
        nudge_id: str,
        device_pk: int,
        action: int,
        action_us: int,
        received_us: int,
    ) -> bool:
        """Record what the person did with one of their nudges, once per action per nudge.

        Both RecordNudgeFeedback and NudgeInteraction events come here: a retry, or the same
        feedback sent both ways, finds the (nudge, action) row and records nothing. Whether
        the nudge is the user's and the feedback new.
        """
        async with self.app.db.transaction() as tx:
            cur = await tx.execute(
                "INSERT OR IGNORE INTO nudge_feedback (user_id, nudge_id, device_pk, action, action_us, received_us)"
                " SELECT user_id, nudge_id, ?, ?, ?, ? FROM nudges WHERE nudge_id = ? AND user_id = ?",
                (device_pk, action, action_us, received_us, nudge_id, user_id),
            )
            return bool(cur.rowcount)

    def pending_events(self) -> int:
        """Committed events queued for the next fold into the features."""
        return self._pending_events

    async def flush(self) -> None:
        """Fold queued committed events into the features of consenting users."""
        async with self._fold_lock:
            await self._fold_pending()

    async def _fold_pending(self) -> None:
        while self._pending:
            user_id, events = self._pending.popleft()
            self._pending_events -= len(events)
            if await self._consents(user_id):
                self.features.apply(user_id, events)
            # Under heavy ingest many batches are queued: let the event loop serve streams
            # between them instead of stalling every ack.
            await asyncio.sleep(0)

    async def _consents(self, user_id: int) -> bool:
        known = self._consenting.get(user_id)
        if known is None:
            granted = await self.app.consent.granted(user_id)
            known = common_pb2.CONSENT_CATEGORY_PERSONALIZATION in granted
            self._consenting[user_id] = known
            if user_id not in self._unwatch:
                self._unwatch[user_id] = self.app.consent.watch(user_id, self._on_consent)
        return known

    def _on_consent(self, user_id: int, states: Any) -> None:
        ok = any(
            s.category == common_pb2.CONSENT_CATEGORY_PERSONALIZATION and s.granted for s in states
        )
        self._consenting[user_id] = ok
        if not ok:
            self.features.forget(user_id)
            self._last_tick.pop(user_id, None)
            self._trigger_stretch.pop(user_id, None)

    async def _erase(self, user_id: int) -> None:
        self.features.forget(user_id)
        self._consenting.pop(user_id, None)
        self._history.pop(user_id, None)
        self._last_tick.pop(user_id, None)
        self._trigger_stretch.pop(user_id, None)
        for pk in [pk for pk, o in self._offline.items() if o.user_id == user_id]:
            del self._offline[pk]
        cancel = self._unwatch.pop(user_id, None)
        if cancel:
            cancel()

    # -- model ----------------------------------------------------------------------------
    def reload_model(self) -> bool:
        """Load the promoted model if current.json changed; whether a new one was loaded."""
        if not self.registry.changed():
            return False
        version = self.registry.current()
        if version is None:
            self.model = None
            return False
        try:
            self.model = self.registry.load(version)
        except Exception:
            log.exception("cannot load promoted nudge model; keeping the previous policy")
            return False
        log.info("nudge model loaded", extra={"version": self.model.version})
        return True

    # -- streams --------------------------------------------------------------------------
    def open_stream(
        self, user_id: int, device_pk: int, device_id: str, kind: int
    ) -> asyncio.Queue[nudges_pb2.Nudge | None]:
        """Register a device's nudge stream (a newer one replaces an older one)."""
        old = self._streams.get(device_pk)
        stream = _Stream(user_id, device_id, kind)
        self._streams[device_pk] = stream
        self._device_kinds[device_pk] = kind
        self.features.note_device(user_id, device_pk, kind)
        if old is not None:
            while not old.queue.empty():
                item = old.queue.get_nowait()
                if item is not None:
                    stream.queue.put_nowait(item)
            old.queue.put_nowait(None)
        return stream.queue

    async def close_stream(
        self, device_pk: int, queue: asyncio.Queue[nudges_pb2.Nudge | None]
    ) -> None:
        """Unregister a stream; its undelivered nudges fall back to another reachable device."""
        stream = self._streams.get(device_pk)
        if stream is None or stream.queue is not queue:
            return
        del self._streams[device_pk]
        left = [n for n in (queue.get_nowait() for _ in range(queue.qsize())) if n is not None]
        for nudge in left:
            await self._fallback(stream.user_id, device_pk, nudge)

    async def _fallback(self, user_id: int, from_pk: int, nudge: nudges_pb2.Nudge) -> None:
        t = self.catalog.type(nudge.nudge_type)
        now = self.app.clock.now_us()
        if nudge.expire_time.ToMicroseconds() <= now:
            return
        devices = [r for r in self._reachable(user_id) if r.device_pk != from_pk]
        from pulsesync.server.nudges.eligibility import route

        pk = route(t, devices)
        if pk is None:
            return  # stays pending for the device; re-sent if it reconnects before expiry
        moved = nudges_pb2.Nudge()
        moved.CopyFrom(nudge)
        stream = self._streams.get(pk)
        moved.device_id = stream.device_id if stream else self._offline[pk].device_id
        async with self.app.db.transaction() as tx:
            await tx.execute(
                "UPDATE nudges SET device_pk = ? WHERE nudge_id = ?", (pk, nudge.nudge_id)
            )
        if stream is not None:
            stream.queue.put_nowait(moved)
        else:
            self._deliver_offline(pk, moved)

    def _reachable(self, user_id: int, now: int | None = None) -> list[Reachable]:
        """Devices a nudge can reach: open streams, push targets, apps that fetch when awake."""
        state = self.features.user(user_id) if user_id in self.features.known_users() else None
        found = [
            Reachable(pk, s.kind, state.device_last_us.get(pk, 0) if state else 0)
            for pk, s in self._streams.items()
            if s.user_id == user_id
        ]
        for pk, o in self._offline.items():
            if o.user_id != user_id or pk in self._streams:
                continue
            if o.push_token and self.push is None:
                continue  # no provider configured: a push target is not a way in
            if not o.push_token and now is not None and now - o.seen_us > FETCH_REACH_US:
                continue  # an app that has not woken lately would see the nudge too late
            found.append(Reachable(pk, o.kind, state.device_last_us.get(pk, 0) if state else 0))
        return found

    def channel_for(self, device_pk: int) -> str:
        """How a nudge routed to the device now reaches it: stream, push or pending."""
        if device_pk in self._streams:
            return "stream"
        o = self._offline.get(device_pk)
        if o is not None and o.push_token and self.push is not None:
            return "push"
        return "pending"

    async def _load_push_targets(self) -> None:
        if self._push_loaded:
            return
        async with self.app.db.reader.execute(
            "SELECT t.device_pk, t.user_id, d.device_id, d.kind, t.push_token, t.update_us"
            " FROM nudge_push_targets t JOIN devices d ON d.device_pk = t.device_pk"
            " WHERE d.revoke_us IS NULL"
        ) as cur:
            for pk, uid, device_id, kind, token, at in await cur.fetchall():
                self._offline[int(pk)] = _Offline(
                    int(uid), str(device_id), int(kind), str(token), int(at)
                )
        self._push_loaded = True

    async def register_push_target(
        self, user_id: int, device_pk: int, device_id: str, kind: int, push_token: str
    ) -> None:
        """Make a device reachable by push (or, with an empty token, no longer)."""
        await self._load_push_targets()
        now = self.app.clock.now_us()
        async with self.app.db.transaction() as tx:
            if push_token:
                await tx.execute(
                    "INSERT INTO nudge_push_targets (device_pk, user_id, push_token, update_us)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (device_pk) DO UPDATE SET"
                    " push_token = excluded.push_token, update_us = excluded.update_us",
                    (device_pk, user_id, push_token, now),
                )
            else:
                await tx.execute("DELETE FROM nudge_push_targets WHERE device_pk = ?", (device_pk,))
        self._offline[device_pk] = _Offline(user_id, device_id, kind, push_token, now)

    async def fetch_pending(
        self, user_id: int, device_pk: int, device_id: str, kind: int
    ) -> list[nudges_pb2.Nudge]:
        """The device's pending nudges, each marked delivered (channel pending); the device
        counts as reachable by fetching for FETCH_REACH_US after."""
        await self._load_push_targets()
        old = self._offline.get(device_pk)
        now = self.app.clock.now_us()
        self._offline[device_pk] = _Offline(
            user_id, device_id, kind, old.push_token if old else "", now
        )
        self._device_kinds[device_pk] = kind
        self.features.note_device(user_id, device_pk, kind)
        out = []
        for nudge in await self.pending_for(user_id, device_pk, device_id):
            if await self.mark_delivered(nudge.nudge_id, device_pk, "pending"):
                out.append(nudge)
        return out

    def _deliver_offline(self, device_pk: int, nudge: nudges_pb2.Nudge) -> None:
        o = self._offline.get(device_pk)
        if o is None or not o.push_token or self.push is None:
            return  # pending: the app fetches it when it wakes
        task = asyncio.get_running_loop().create_task(
            self._push(device_pk, o.push_token, nudge), name="nudge-push"
        )
        self._feedback_tasks.add(task)
        task.add_done_callback(self._feedback_tasks.discard)

    async def _push(self, device_pk: int, token: str, nudge: nudges_pb2.Nudge) -> None:
        assert self.push is not None
        try:
            if await self.push.push(token, nudge):
                await self.mark_delivered(nudge.nudge_id, device_pk, "push")
        except Exception:
            log.exception("push delivery failed; the nudge waits to be fetched")

    async def pending_for(
        self, user_id: int, device_pk: int, device_id: str
    ) -> list[nudges_pb2.Nudge]:
        """Undelivered, unexpired nudges routed to a device (re-sent when it reconnects)."""
        now = self.app.clock.now_us()
        async with self.app.db.reader.execute(
            "SELECT nudge_id, nudge_type, title, message, data, probability, reasons, create_us, expire_us"
            " FROM nudges WHERE user_id = ? AND device_pk = ? AND state = 'pending' AND expire_us > ?"
            " ORDER BY create_us",
            (user_id, device_pk, now),
        ) as cur:
            rows = await cur.fetchall()
        return [
            nudges_pb2.Nudge(
                nudge_id=r[0], nudge_type=r[1], title=r[2], message=r[3], data=json.loads(r[4]),
                probability=r[5], reasons=json.loads(r[6]), create_time=_ts(r[7]),
                expire_time=_ts(r[8]), device_id=device_id,
            )
            for r in rows
        ]  # fmt: skip

    async def mark_delivered(self, nudge_id: str, device_pk: int, channel: str = "stream") -> bool:
        """The nudge reached the device (written to its stream, pushed, or fetched); whether
        this call delivered it (False when another path already had)."""
        now = self.app.clock.now_us()
        async with self.app.db.transaction() as tx:
            cur = await tx.execute(
                "UPDATE nudges SET state = 'delivered', deliver_us = ?, device_pk = ?, channel = ?"
                " WHERE nudge_id = ? AND state = 'pending'",
                (now, device_pk, channel, nudge_id),
            )
            return bool(cur.rowcount)

    # -- decisions ------------------------------------------------------------------------
    async def history(self, user_id: int, now_us: int) -> list[tuple[str, int]]:
        """The user's nudges of the last two days (type, create time)."""
        cached = self._history.get(user_id)
        if cached is None:
            async with self.app.db.reader.execute(
                "SELECT nudge_type, create_us FROM nudges WHERE user_id = ? AND create_us > ? ORDER BY create_us",
                (user_id, now_us - HISTORY_US),
            ) as cur:
                cached = [(str(t), int(at)) for t, at in await cur.fetchall()]
            self._history[user_id] = cached
        cutoff = now_us - HISTORY_US
        if cached and cached[0][1] < cutoff:
            cached[:] = [h for h in cached if h[1] >= cutoff]
        return cached

    async def tick(self, now_us: int | None = None) -> list[Decision]:
        """Run everything due at now: decisions, expiry, outcomes."""
        now = self.app.clock.now_us() if now_us is None else now_us
        await self.flush()
        self.reload_model()
        made: list[Decision] = []
        for user_id in self.features.known_users():
            trigger = await self._due(user_id, now)
            if trigger is not None:
                made.append(await self.decide(user_id, now, trigger))
        await self.expire(now)
        await self.complete_outcomes(now)
        return made

    async def _due(self, user_id: int, now: int) -> str | None:
        profile = await self.profiles.nudge_profile(user_id)
        last = self._last_tick.get(user_id)
        self._last_tick[user_id] = now
        if last is None or now <= last:
            return None
        p = self.catalog.policy
        state = self.features.user(user_id)
        # A sedentary stretch is named by the minute it began after, not by now minus its
        # (capped) length: once the length reaches its cap the latter moves every tick.
        since = state.sedentary_since()
        long_stretch = since if state.sedentary_min(now) >= p.sedentary_trigger_min else None
        if self._scheduled_between(last, now, profile.time_zone):
            if long_stretch is not None:  # this decision point serves the stretch
                self._trigger_stretch[user_id] = long_stretch
            return "schedule"
        if long_stretch is not None and self._trigger_stretch.get(user_id) != long_stretch:
            self._trigger_stretch[user_id] = long_stretch
            return "sedentary"
        return None

    def _scheduled_between(self, last: int, now: int, tz: str) -> bool:
        """Whether a scheduled local time falls in (last, now]."""
        lt_now = local_time(now, tz)
        lt_last = local_time(last, tz)
        for minute in self.catalog.policy.schedule_min:
            for day in {lt_last.date(), lt_now.date()}:
                t = lt_now.replace(
                    year=day.year,
                    month=day.month,
                    day=day.day,
                    hour=minute // 60,
                    minute=minute % 60,
                    second=0,
                    microsecond=0,
                )
                if lt_last < t <= lt_now:
                    return True
        return False

    async def decide(self, user_id: int, now: int, trigger: str) -> Decision:
        """One decision point: eligibility, prediction, choice, log, delivery."""
        started = time.perf_counter()
        await self._load_push_targets()
        profile = await self.profiles.nudge_profile(user_id)
        granted = await self.app.consent.granted(user_id)
        hist = await self.history(user_id, now)
        today = local_day(now, profile.time_zone)
        nudges_today = sum(1 for _, at in hist if local_day(at, profile.time_zone) == today)
        ctx = self.features.context(user_id, now, profile.time_zone, nudges_today, self._habitual)
        elig = eligible(
            self.catalog, now_us=now, granted=granted, profile=profile, history=hist, context=ctx,
            devices=self._reachable(user_id, now),
        )  # fmt: skip
        model = self.model
        predicted = (
            model.predict(ctx.values, ctx.past_gain, elig.options, ctx.past_response)
            if model and len(elig.options) > 1
            else None
        )
        choice = choose(
            elig.options,
            predicted,
            self.catalog.policy,
            self.rng,
            model.min_gain(self.catalog.policy.min_gain_steps) if model else None,
        )
        version = model.version if model else COLD_START
        nudge = (
            self._make_nudge(choice.chosen, choice.probability, elig, ctx, profile, now)
            if choice.chosen != NONE_ACTION
            else None
        )
        decision_id = await self._log(
            user_id,
            now,
            trigger,
            version,
            ctx,
            elig,
            choice.probabilities,
            choice.chosen,
            predicted,
            nudge,
        )
        if nudge is not None:
            hist.append((nudge.nudge_type, now))
            self.features.user(user_id).record_nudge(nudge.nudge_type, now)
            pk = elig.device_for[nudge.nudge_type]
            stream = self._streams.get(pk)
            if stream is not None:
                if not stream.queue.full():
                    stream.queue.put_nowait(nudge)
            else:
                self._deliver_offline(pk, nudge)
        latency = time.perf_counter() - started
        self.latencies.append(latency)
        return Decision(
            decision_id, user_id, now, elig, choice.probabilities, choice.chosen, nudge, latency
        )

    def _make_nudge(
        self,
        name: str,
        probability: float,
        elig: Eligibility,
        ctx: Any,
        profile: NudgeProfile,
        now: int,
    ) -> nudges_pb2.Nudge:
        t = self.catalog.type(name)
        values = dict(template_values(ctx, profile))
        pk = elig.device_for[name]
        stream = self._streams.get(pk)
        offline = self._offline.get(pk)
        device_id = stream.device_id if stream else offline.device_id if offline else ""
        return nudges_pb2.Nudge(
            nudge_id="ndg_" + secrets.token_hex(8),
            nudge_type=name,
            title=t.title,
            message=t.message.format_map(values),
            create_time=_ts(now),
            expire_time=_ts(now + t.expire_us),
            device_id=device_id,
            probability=probability,
            reasons=_reasons(t, ctx, profile, now),
            data=profile.continuity.data()
            if t.needs_continuity_item and profile.continuity
            else {},
        )

    async def _log(
        self,
        user_id: int,
        now: int,
        trigger: str,
        version: str,
        ctx: Any,
        elig: Eligibility,
        probs: dict[str, float],
        chosen: str,
        predicted: dict[str, float] | None,
        nudge: nudges_pb2.Nudge | None,
    ) -> int:
        features = {**ctx.values, "past_gain": ctx.past_gain, "past_response": ctx.past_response}
        async with self.app.db.transaction() as tx:
            cur = await tx.execute(
                "INSERT INTO nudge_decisions (user_id, decision_us, trigger, policy_version, features, options,"
                " ineligible, chosen, probability, predicted, nudge_id) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (user_id, now, trigger, version, json.dumps(features), json.dumps(probs), json.dumps(elig.ineligible),
                 chosen, probs[chosen], json.dumps(predicted or {}), nudge.nudge_id if nudge else None),
            )  # fmt: skip
            decision_id = int(cur.lastrowid or 0)
            if nudge is not None:
                t = self.catalog.type(nudge.nudge_type)
                await tx.execute(
                    "INSERT INTO nudges (nudge_id, user_id, decision_id, nudge_type, device_pk, title, message, data,"
                    " probability, reasons, create_us, expire_us, state, outcome_metric) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,'pending',?)",
                    (nudge.nudge_id, user_id, decision_id, nudge.nudge_type, elig.device_for[nudge.nudge_type],
                     nudge.title, nudge.message, json.dumps(dict(nudge.data)), nudge.probability,
                     json.dumps(list(nudge.reasons)), now, now + t.expire_us, t.outcome),
                )  # fmt: skip
        return decision_id

    # -- expiry and outcomes ----------------------------------------------------------------
    async def expire(self, now: int) -> int:
        """Mark undelivered nudges past their expiry; how many."""
        async with self.app.db.transaction() as tx:
            cur = await tx.execute(
                "UPDATE nudges SET state = 'expired' WHERE state = 'pending' AND expire_us <= ?",
                (now,),
            )
            return int(cur.rowcount or 0)

    async def steps_after(self, user_id: int, start_us: int) -> int:
        """Steps in [start, start + window) by the steps rule (timeline/steps.py): the outcome."""
        return await steps_in_window(
            self.timeline, user_id, start_us, self.catalog.policy.outcome_window_us
        )

    async def complete_outcomes(self, now: int) -> int:
        """Compute outcomes of decisions whose window and grace have passed; how many."""
        p = self.catalog.policy
        async with self.app.db.reader.execute(
            "SELECT decision_id, user_id, decision_us, chosen, nudge_id, features FROM nudge_decisions"
            " WHERE outcome_complete = 0 AND decision_us <= ? ORDER BY decision_us",
            (now - p.outcome_window_us - p.outcome_grace_us,),
        ) as cur:
            rows = await cur.fetchall()
        if not rows:
            return 0
        done: list[tuple[float, int]] = []
        nudge_updates: list[tuple[float, str]] = []
        for decision_id, user_id, decision_us, chosen, nudge_id, features in rows:
            steps = float(await self.steps_after(user_id, decision_us))
            done.append((steps, decision_id))
            acted: float | None = None
            if nudge_id:
                metric = (
                    self.catalog.type(chosen).outcome
                    if chosen in self.catalog.actions
                    else "steps_30m"
                )
                acted = await self._acted(nudge_id)
                nudge_updates.append((steps if metric == "steps_30m" else acted, nudge_id))
            if user_id in self.features.known_users():
                minute = int(json.loads(features).get("local_minute", 0))
                state = self.features.user(user_id)
                state.record_outcome(chosen, hour_bucket(minute), steps)
                if acted is not None:
                    state.record_response(chosen, acted > 0)
        async with self.app.db.transaction() as tx:
            await tx.executemany(
                "UPDATE nudge_decisions SET outcome_steps = ?, outcome_complete = 1 WHERE decision_id = ?",
                done,
            )
            await tx.executemany(
                "UPDATE nudges SET outcome_value = ?, outcome_complete = 1 WHERE nudge_id = ?",
                nudge_updates,
            )
        return len(done)

    async def _acted(self, nudge_id: str) -> float:
        async with self.app.db.reader.execute(
            "SELECT 1 FROM nudge_feedback WHERE nudge_id = ? AND action = ? LIMIT 1",
            (nudge_id, events_pb2.NUDGE_ACTION_ACTED),
        ) as cur:
            return 1.0 if await cur.fetchone() else 0.0

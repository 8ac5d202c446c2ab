"""The nudge loop on the server: decision points, eligibility, policy, delivery, outcomes.

    tick(now) ─► fold committed events into features ─► reload the model if promoted anew
             ─► for each tracked user: scheduled times passed since the last tick, or a long
                sedentary stretch ─► decide ─► log ─► queue on the device in use
             ─► expire undelivered nudges ─► compute outcomes whose window (+ grace) closed

With several replicas each decides only for the shards of people it holds a lease on
(`pulsesync.server.cluster`); expiry and outcomes are cluster-wide jobs run by one replica.
When a shard changes hands the new holder starts its users afresh (the first tick only marks
the time) and counts a sedentary stretch already under way as served, so no decision point
is taken twice; those within the takeover window are missed. That window ends at the tick
the new holder runs as soon as it takes the shards (`take_over`), not at its next periodic one.

`tick` runs from a background task every `TICK_SECONDS` of real time, and after a takeover;
ticks never overlap. Simulations with a fake clock call it themselves after moving the clock
(`NudgeConfig.scheduler = "manual"`; nothing ticks at a takeover then).
The parts live beside this module: `feed` (committed events into features), `delivery`
(streams, push, fetch) and `outcomes` (expiry and the steps after each decision).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import Histogram

from pulsesync.server.clock import Clock
from pulsesync.server.cluster import AllShards, Shards, shard_of
from pulsesync.server.nudges.catalog import NONE_ACTION, Catalog, NudgeType
from pulsesync.server.nudges.delivery import NudgeDelivery
from pulsesync.server.nudges.eligibility import (
    Eligibility,
    NudgeProfile,
    eligible,
    template_values,
)
from pulsesync.server.nudges.features import FeatureStore, local_day, local_time
from pulsesync.server.nudges.feed import FeatureFeed
from pulsesync.server.nudges.model import OutcomeModel, best_gain
from pulsesync.server.nudges.outcomes import Outcomes
from pulsesync.server.nudges.pacing import BudgetPacer
from pulsesync.server.nudges.policy import COLD_START, choose
from pulsesync.server.nudges.profiles import ProfileSource
from pulsesync.server.nudges.push import PushProvider
from pulsesync.server.nudges.registry import ModelRegistry
from pulsesync.server.privacy.consent import ConsentStore
from pulsesync.server.storage.nudges import (
    DecisionRow,
    NewNudge,
    NudgeHistoryRow,
    NudgeRow,
    NudgeStorage,
)
from pulsesync.server.timeline.store import TimelineStore
from pulsesync.timeutil import timestamp as _ts
from pulsesync.v1 import nudges_pb2

log = logging.getLogger(__name__)

# Real seconds between ticks: scheduled decisions land within this of their time.
TICK_SECONDS: Final = 15.0
# Nudge history kept in memory per user: enough for two days of caps and cooldowns.
HISTORY_US: Final = 48 * 3600 * 1_000_000


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
    """Decides nudges for every user of one server; feeds, delivers and measures them through
    its parts (`feed`, `delivery`, `outcomes`)."""

    def __init__(
        self,
        storage: NudgeStorage,
        *,
        clock: Clock,
        consent: ConsentStore,
        timeline: TimelineStore,
        profiles: ProfileSource,
        catalog: Catalog,
        registry: ModelRegistry,
        push: PushProvider | None = None,
        decision_seconds: Histogram | None = None,
        seed: int | None = None,
        shards: Shards | None = None,
    ) -> None:
        self._storage = storage
        self.shards: Shards = shards or AllShards()
        self._held: dict[int, int] = {}  # shard -> epoch, as of the last tick
        self._ticking = asyncio.Lock()
        # Whether expiry and outcomes run here (the cluster-wide job's lease holder).
        self.runs_outcomes: Callable[[], Awaitable[bool]] | None = None
        # Reads events other replicas committed into the feed (several replicas ingesting).
        self.pull: Callable[[], Awaitable[object]] | None = None
        self._clock = clock
        self._consent = consent
        self.catalog = catalog
        self.profiles = profiles
        self.registry = registry
        self.features = FeatureStore(self.catalog.policy.active_window_us)
        self.timeline = timeline
        self.model: OutcomeModel | None = None
        p = self.catalog.policy
        # The learned policy's threshold, kept at its daily budget on its own decision points.
        self.pacer = BudgetPacer(p.daily_budget, p.min_gain_steps, p.exploration_floor)
        self.rng = random.Random(seed if seed is not None else secrets.randbits(64))
        self._decision_seconds = decision_seconds
        self._last_tick: dict[int, int] = {}
        self._trigger_stretch: dict[int, int] = {}
        self._history: dict[int, list[tuple[str, int]]] = {}
        self.feed = FeatureFeed(self.features, consent, self.record_feedback, self._withdrawn)
        self.delivery = NudgeDelivery(storage, clock, catalog, self.features, push)
        self.outcomes = Outcomes(storage, timeline, catalog, self.features)
        self._habitual = tuple(
            t.near_habitual_feature for t in self.catalog.types if t.near_habitual_feature
        )

    @property
    def deciding_for(self) -> frozenset[int]:
        """The shards of people decided for as of the last tick."""
        return frozenset(self._held)

    @property
    def push(self) -> PushProvider | None:
        return self.delivery.push

    def close(self) -> None:
        self.feed.close()
        self.delivery.close()

    # -- feedback, consent, erasure -------------------------------------------------------
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
        return await self._storage.add_feedback(
            user_id, nudge_id, device_pk, action, action_us, received_us
        )

    async def owns(self, user_id: int, nudge_id: str) -> bool:
        """Whether the nudge exists and is the person's."""
        return await self._storage.owns(user_id, nudge_id)

    async def history_page(
        self, user_id: int, start_us: int, end_us: int, after: tuple[int, str] | None, limit: int
    ) -> list[NudgeHistoryRow]:
        """The person's nudges created in [start, end), newest first, keyset-paged after
        (create_us, nudge_id), each with its feedback and outcome (ListNudges)."""
        return await self._storage.history_page(user_id, start_us, end_us, after, limit)

    async def feedback_settled(self) -> None:
        """Wait until feedback from interaction events is recorded and pushes are done."""
        await self.feed.settled()
        await self.delivery.settled()

    def pending_events(self) -> int:
        """Committed events queued for the next fold into the features."""
        return self.feed.pending_events()

    async def flush(self) -> None:
        """Fold queued committed events into the features of consenting users."""
        await self.feed.flush()

    def _withdrawn(self, user_id: int) -> None:
        self._last_tick.pop(user_id, None)
        self._trigger_stretch.pop(user_id, None)

    async def erase_user(self, user_id: int) -> None:
        """Erase hook: forget everything held in memory about the person."""
        self.feed.forget_user(user_id)
        self._history.pop(user_id, None)
        self._last_tick.pop(user_id, None)
        self._trigger_stretch.pop(user_id, None)
        self.delivery.forget_user(user_id)

    # -- model ----------------------------------------------------------------------------
    async def reload_model(self) -> bool:
        """Load the promoted model if the promotion changed; whether a new one was loaded."""
        if not await self.registry.changed():
            return False
        version = await self.registry.current()
        if version is None:
            self.model = None
            return False
        try:
            self.model = await self.registry.load(version)
        except Exception:
            log.exception("cannot load promoted nudge model; keeping the previous policy")
            return False
        log.info("nudge model loaded", extra={"version": self.model.version})
        return True

    # -- delivery (see `delivery`) ---------------------------------------------------------
    def open_stream(
        self, user_id: int, device_pk: int, device_id: str, kind: int
    ) -> asyncio.Queue[nudges_pb2.Nudge | None]:
        return self.delivery.open_stream(user_id, device_pk, device_id, kind)

    async def close_stream(
        self, device_pk: int, queue: asyncio.Queue[nudges_pb2.Nudge | None]
    ) -> None:
        await self.delivery.close_stream(device_pk, queue)

    async def pending_for(
        self, user_id: int, device_pk: int, device_id: str
    ) -> list[nudges_pb2.Nudge]:
        return await self.delivery.pending_for(user_id, device_pk, device_id)

    async def mark_delivered(self, nudge_id: str, device_pk: int, channel: str = "stream") -> bool:
        return await self.delivery.mark_delivered(nudge_id, device_pk, channel)

    async def fetch_pending(
        self, user_id: int, device_pk: int, device_id: str, kind: int
    ) -> list[nudges_pb2.Nudge]:
        return await self.delivery.fetch_pending(user_id, device_pk, device_id, kind)

    async def register_push_target(
        self, user_id: int, device_pk: int, device_id: str, kind: int, push_token: str
    ) -> None:
        await self.delivery.register_push_target(user_id, device_pk, device_id, kind, push_token)

    def channel_for(self, device_pk: int) -> str:
        return self.delivery.channel_for(device_pk)

    # -- outcomes (see `outcomes`) ----------------------------------------------------------
    async def expire(self, now: int) -> int:
        return await self.outcomes.expire(now)

    async def steps_after(self, user_id: int, start_us: int) -> int:
        return await self.outcomes.steps_after(user_id, start_us)

    async def complete_outcomes(self, now: int) -> int:
        return await self.outcomes.complete(now)

    # -- decisions ------------------------------------------------------------------------
    async def history(self, user_id: int, now_us: int) -> list[tuple[str, int]]:
        """The user's nudges of the last two days (type, create time)."""
        cached = self._history.get(user_id)
        if cached is None:
            cached = await self._storage.recent(user_id, now_us - HISTORY_US)
            self._history[user_id] = cached
        cutoff = now_us - HISTORY_US
        if cached and cached[0][1] < cutoff:
            cached[:] = [h for h in cached if h[1] >= cutoff]
        return cached

    async def tick(self, now_us: int | None = None) -> list[Decision]:
        """Run everything due at now: decisions, expiry, outcomes. Ticks run one at a time
        (the periodic one, one after a takeover, a simulation's): a second waits for the
        first, then runs at its own now."""
        async with self._ticking:
            return await self._tick(now_us)

    async def take_over(self, taken: frozenset[int]) -> list[Decision]:
        """Tick now for shards this replica has just taken, rather than at the next periodic
        tick: their people start afresh from this tick (it marks their time), so decision
        points after it are taken and only those between the old holder's end and now are
        missed. Its log line says how long it took (`tick_s`: waiting for a running tick,
        reading the taken people's recent events into the features, the tick itself)."""
        started = time.perf_counter()
        async with self._ticking:
            made = await self._tick(None)
            now_held = taken & self._held.keys()
            if now_held:
                log.info(
                    "took over %d nudge shards; deciding for %d",
                    len(now_held),
                    len(self._held),
                    extra={
                        "nudge_shards_taken": len(now_held),
                        "nudge_shards_held": len(self._held),
                        "tick_s": round(time.perf_counter() - started, 3),
                    },
                )
            return made

    async def _tick(self, now_us: int | None) -> list[Decision]:
        now = self._clock.now_us() if now_us is None else now_us
        if self.pull is not None:
            await self.pull()
        await self.flush()
        await self.reload_model()
        if self.model is not None:
            self.pacer.refresh(now)
        made: list[Decision] = []
        held = await self._take_shards()
        n = self.shards.shards
        due: list[tuple[int, str]] = []
        for user_id in self.features.known_users():
            if shard_of(user_id, n) not in held:
                continue
            trigger = await self._due(user_id, now)
            if trigger is not None:
                due.append((user_id, trigger))
        # Their devices reachable through other replicas: one query for everyone due.
        await self.delivery.refresh_elsewhere([u for u, _ in due], now)
        for user_id, trigger in due:
            made.append(await self.decide(user_id, now, trigger))
        if self.runs_outcomes is None or await self.runs_outcomes():
            await self.outcomes.expire(now)
            await self.outcomes.complete(now)
        return made

    async def _take_shards(self) -> dict[int, int]:
        """The shards decided for now; users of a shard that changed hands start afresh."""
        held = await self.shards.held()
        changed = {s for s, epoch in held.items() if self._held.get(s) != epoch}
        changed |= set(self._held) - set(held)
        if changed:
            n = self.shards.shards
            for user_id in self.features.known_users():
                shard = shard_of(user_id, n)
                if shard not in changed:
                    continue
                # Decisions made elsewhere meanwhile are in storage, not here: reread them.
                self._history.pop(user_id, None)
                self._last_tick.pop(user_id, None)
                since = self.features.user(user_id).sedentary_since()
                if held.get(shard, 0) > 1 and since is not None:
                    # Taken over from another replica, which may have served the stretch.
                    self._trigger_stretch[user_id] = since
                else:
                    self._trigger_stretch.pop(user_id, None)
        self._held = held
        return held

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
        await self.delivery.load_push_targets()
        profile = await self.profiles.nudge_profile(user_id)
        granted = await self._consent.granted(user_id)
        hist = await self.history(user_id, now)
        today = local_day(now, profile.time_zone)
        nudges_today = sum(1 for _, at in hist if local_day(at, profile.time_zone) == today)
        ctx = self.features.context(user_id, now, profile.time_zone, nudges_today, self._habitual)
        elig = eligible(
            self.catalog, now_us=now, granted=granted, profile=profile, history=hist, context=ctx,
            devices=self.delivery.reachable(user_id, now),
        )  # fmt: skip
        model = self.model
        predicted = (
            model.predict(ctx.values, ctx.past_gain, elig.options, ctx.past_response)
            if model and len(elig.options) > 1
            else None
        )
        threshold: float | None = None
        if model is not None:
            trained = model.min_gain(self.catalog.policy.min_gain_steps)
            threshold = self.pacer.threshold(model.version, trained, now)
            best = best_gain(predicted, elig.options) if predicted is not None else None
            self.pacer.record(model.version, (user_id, today), now, best, len(elig.options))
        choice = choose(
            elig.options, predicted, self.catalog.policy, self.rng, threshold,
            ctx.values.get("local_minute"),
        )  # fmt: skip
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
            self.delivery.send(elig.device_for[nudge.nudge_type], nudge)
        latency = time.perf_counter() - started
        if self._decision_seconds is not None:
            self._decision_seconds.observe(latency)
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
        device_id = self.delivery.device_id(elig.device_for[name])
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
        new: NewNudge | None = None
        if nudge is not None:
            t = self.catalog.type(nudge.nudge_type)
            row = NudgeRow(
                nudge.nudge_id, nudge.nudge_type, nudge.title, nudge.message,
                json.dumps(dict(nudge.data)), nudge.probability, json.dumps(list(nudge.reasons)),
                now, now + t.expire_us,
            )  # fmt: skip
            new = NewNudge(row, elig.device_for[nudge.nudge_type], t.outcome)
        decision_id = await self._storage.log_decision(
            DecisionRow(
                user_id, now, trigger, version, json.dumps(features), json.dumps(probs),
                json.dumps(elig.ineligible), chosen, probs[chosen], json.dumps(predicted or {}),
            ),
            new,
        )  # fmt: skip
        return decision_id

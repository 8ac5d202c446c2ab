"""The demo's day, minute by minute: what each person does in the apps, the nudges their
devices show and answer, the wearable's sensors, and the scripted profile and consent moments.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Coroutine
from datetime import UTC, datetime
from typing import Any, Final

import grpc

from pulsesync.edge_agent.ble.bridge import Bridge, BridgeConfig
from pulsesync.edge_agent.ble.bumble_backend import VirtualAir
from pulsesync.edge_agent.ble.emulation import Footpod, HeartRateStrap
from pulsesync.edge_agent.ble.physiology import HeartModel, StrideModel
from pulsesync.edge_agent.client import open_channel
from pulsesync.edge_agent.profiles import ProfileSync
from pulsesync.server.demo.base import WorldBase
from pulsesync.server.demo.model import (
    CONSENT_WITHDRAW_AT,
    NUDGE_TICK_S,
    OUTCOME_WAIT_S,
    PROFILE_EDIT_AT,
    SENSOR_TICK_S,
    NudgeSeen,
    PersonRun,
)
from pulsesync.server.demo.persona import Doing, PersonaTrack
from pulsesync.server.nudges.catalog import load_catalog
from pulsesync.timeutil import US_PER_MIN, US_PER_S
from pulsesync.v1 import (
    common_pb2,
    events_pb2,
    nudges_pb2,
    nudges_pb2_grpc,
    profiles_pb2,
)

log = logging.getLogger(__name__)

# How long a sensor tick waits for the bridge to have its readings (a link that is down
# delivers nothing), and how often it looks.
DELIVERY_TIMEOUT_S: Final = 2.0
_DELIVERY_POLL_S: Final = 0.0005


class Day(WorldBase):
    """The simulated day: the devices' background work and the person's minutes and moments."""

    def _background(self, person: PersonRun) -> list[Coroutine[Any, Any, None]]:
        tasks: list[Coroutine[Any, Any, None]] = []
        for d in person.devices.values():
            tasks.append(self._guard(d.consent.run(), f"{person.name} {d.label} consent"))
        for label, sync in person.profiles.items():
            tasks.append(self._guard(self._profile_loop(person, label, sync), f"{label} profile"))
        for label in ("phone", "desktop"):
            tasks.append(self._guard(self._nudge_loop(person, label), f"{label} nudges"))
        tasks.append(self._guard(self._wearable(person), f"{person.name} wearable"))
        return tasks

    async def _guard(self, coro: Awaitable[object], what: str) -> None:
        """Run a background coroutine until cancelled; log (not raise) a failure."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("demo task %s failed", what)

    # -- devices' background work ----------------------------------------------------------------
    async def _profile_loop(self, person: PersonRun, label: str, sync: ProfileSync) -> None:
        d = person.devices[label]
        async with open_channel(d.creds.server) as channel:
            await sync.run(channel, d.creds.metadata)

    async def _nudge_loop(self, person: PersonRun, label: str) -> None:
        """The app's nudge inbox: show each nudge, let the person answer, report feedback."""
        d = person.devices[label]
        async with open_channel(d.creds.server) as channel:
            stub = nudges_pb2_grpc.NudgeServiceStub(channel)
            while True:
                try:
                    call = stub.SubscribeNudges(
                        nudges_pb2.SubscribeNudgesRequest(), metadata=d.creds.metadata
                    )
                    async for msg in call:
                        await self._answer(person, label, stub, msg.nudge)
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                        return
                await asyncio.sleep(0.2)

    async def _answer(
        self,
        person: PersonRun,
        label: str,
        stub: nudges_pb2_grpc.NudgeServiceAsyncStub,
        nudge: nudges_pb2.Nudge,
    ) -> None:
        now = self.clock.now_us()
        acted = person.persona.answer(nudge.nudge_type, now)
        person.nudges.append(NudgeSeen(nudge, label, now, acted))
        why = "; ".join(nudge.reasons) or "eligible"
        self.note(
            person,
            "nudge",
            f"→ {label}: {nudge.title!r} (p={nudge.probability:.2f}; {why})",
        )
        d = person.devices[label]
        actions = [events_pb2.NUDGE_ACTION_OPENED]
        actions.append(
            events_pb2.NUDGE_ACTION_ACTED if acted else events_pb2.NUDGE_ACTION_DISMISSED
        )
        for action in actions:
            req = nudges_pb2.RecordNudgeFeedbackRequest(nudge_id=nudge.nudge_id, action=action)
            req.action_time.FromMicroseconds(self.clock.now_us())
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.RecordNudgeFeedback(req, metadata=d.creds.metadata, timeout=5)
        self.note(
            person,
            "feedback",
            f"{label}: {'acted on' if acted else 'dismissed'} {nudge.nudge_type}",
        )
        if acted and nudge.nudge_type == "resume_item":
            person.devices["phone"].agent.tracker.screen_view(
                nudge.data.get("app", "lingo"), "lesson", 120.0
            )

    async def _wearable(self, person: PersonRun) -> None:
        """The wearable bridge: emulated strap and footpod on a virtual BLE link, read by the
        production bridge; their heart and stride follow the person's day."""
        tracker = person.devices["wearable"].agent.tracker
        air = VirtualAir()
        await air.power_on()
        seed = person.persona.seed
        start = self.clock.now_us()
        strap = HeartRateStrap(air, seed=seed, seconds_per_tick=SENSOR_TICK_S)
        strap.heart = HeartModel(seed, PersonaTrack(person.persona, start))  # type: ignore[arg-type]
        pod = Footpod(air, seed=seed, seconds_per_tick=SENSOR_TICK_S)
        pod.stride = StrideModel(seed + 1, PersonaTrack(person.persona, start))  # type: ignore[arg-type]
        sensors = [strap, pod]
        for s in sensors:
            await s.start()
        delivering: int | None = None  # the moment of the tick being delivered, if one is

        def bridge_clock_us() -> int:
            return delivering if delivering is not None else self.clock.now_us()

        bridge = Bridge(
            tracker,
            [s.address for s in sensors],
            config=BridgeConfig(scan_timeout_s=2.0, seed=seed),
            backends=air.backends(),
            clock_us=bridge_clock_us,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(bridge.run())
                for n in itertools.count(1):
                    # The bridge stamps a reading with its clock when it handles it: a loop
                    # running late would stamp it seconds of simulated time after the sensor
                    # took it, and the step count drops cadence samples further apart than
                    # MAX_CADENCE_GAP_S. While the tick's readings are delivered, the bridge's
                    # clock reads the tick's own moment.
                    tick_us = start + int(n * SENSOR_TICK_S * US_PER_S)
                    await self.clock.sleep_until(tick_us)
                    before = [link.stats.notifications for link in bridge.links]
                    delivering = tick_us
                    for s in sensors:
                        await s.tick()
                    await _delivered(bridge, before)
                    delivering = None
        finally:
            for s in sensors:
                await s.close()

    # -- the day ---------------------------------------------------------------------------------
    async def _play(self) -> None:
        """Walk through the simulated period minute by minute."""
        minutes = int((self.end_us - self.start_us) // US_PER_MIN)
        edit_at = self.start_us + int(minutes * PROFILE_EDIT_AT) * US_PER_MIN
        withdraw_at = self.start_us + int(minutes * CONSENT_WITHDRAW_AT) * US_PER_MIN
        for person in self.people:
            self._first_profile(person)
        for m in range(minutes):
            t = self.start_us + m * US_PER_MIN
            await self.clock.sleep_until(t)
            for person in self.people:
                self._act(person, t)
                if t == edit_at:
                    await self._profile_moment(person)
                if t == withdraw_at:
                    await self._consent_moment(person)
            if m % 60 == 59:
                self._merged_so_far()
                await self._outcomes_so_far()
            self.progress(t)
        self.progress(self.end_us)
        await self._outcomes_due()

    async def _outcomes_due(self) -> None:
        """Wait for, and announce, the outcomes of nudges whose window closed in the period.

        The server measures an outcome on its first tick after the window and a grace period
        for late uploads; the hourly looks of `_play` may all come before that tick (always
        for a nudge in the last hour), so the end of the period waits on the condition itself,
        with a generous real-time deadline, while the simulated clock runs on."""
        window_us = load_catalog(self.options.nudge_catalog).policy.outcome_window_us
        deadline = time.monotonic() + OUTCOME_WAIT_S
        while await self._outcomes_so_far(due_by=self.end_us - window_us):
            if time.monotonic() > deadline:
                log.warning("outcomes not measured %.0f s after the period", OUTCOME_WAIT_S)
                return
            await asyncio.sleep(NUDGE_TICK_S)

    def _first_profile(self, person: PersonRun) -> None:
        def setup(p: profiles_pb2.Profile) -> None:
            p.time_zone = "UTC"
            p.quiet_hours.start_minute = 22 * 60
            p.quiet_hours.end_minute = 7 * 60
            p.goals.daily_steps = 8000
            p.goals.daily_study_minutes = 20

        person.profiles["phone"].edit(setup)

    def _act(self, person: PersonRun, t: int) -> None:
        """What the person does in the apps during minute t."""
        doing = person.persona.doing_at(t)
        seg = person.persona.segment_at(t)
        app = seg.app if doing in (Doing.DESK, Doing.PHONE) else ""
        device = "desktop" if doing == Doing.DESK else "phone"
        for label in ("phone", "desktop"):
            current = person.sessions.get(label)
            if current and (label != device or current[0] != app):
                app_was, sid, began = current
                person.devices[label].agent.tracker.session_end(
                    app_was, sid, (t - began) / 1e6, at_us=t
                )
                del person.sessions[label]
        if not app:
            return
        tracker = person.devices[device].agent.tracker
        if device not in person.sessions:
            sid = tracker.session_start(app, at_us=t)
            person.sessions[device] = (app, sid, t)
        rng = person.persona.rng
        at = t + rng.randrange(0, US_PER_MIN)
        if app == "workbench":
            feature = rng.choices(["editor", "review", "terminal", "mail"], [5, 2, 2, 1])[0]
            tracker.feature_use(app, feature, 60.0, at_us=at)
            if rng.random() < 0.3:
                tracker.tap(app, feature, rng.choice(["save", "run", "next", "reply"]), at_us=at)
            if rng.random() < 0.05:
                tracker.search(
                    app, rng.choice(["timeout config", "release notes", "retry"]), 7, at_us=at
                )
        elif app == "lingo":
            feature = rng.choices(["flashcards", "lesson", "quiz"], [4, 3, 1])[0]
            tracker.feature_use(app, feature, 60.0, at_us=at)
            tracker.screen_view(app, feature, 55.0, at_us=at)
        elif app == "news":
            tracker.screen_view(app, f"article-{rng.randrange(1, 40)}", 50.0, at_us=at)
            if rng.random() < 0.2:
                tracker.tap(app, "article", "share", at_us=at)
        else:
            tracker.screen_view(app, "player", 60.0, at_us=at)

    async def _outcomes_so_far(self, due_by: int | None = None) -> int:
        """Announce outcomes the server has measured since the last look (its window of
        30 minutes after the nudge, plus a grace period for late uploads, has closed); the
        number of nudges sent at or before `due_by` whose outcome is not measured yet."""
        pending = 0
        for person in self.people:
            phone = person.devices["phone"]
            async with open_channel(phone.creds.server) as channel:
                records = await self._nudge_history(channel, phone.creds.metadata)
            for r in records:
                if not r.outcome.complete:
                    sent_us = r.nudge.create_time.ToMicroseconds()
                    pending += due_by is not None and sent_us <= due_by
                    continue
                if r.nudge.nudge_id in person.outcomes_shown:
                    continue
                person.outcomes_shown.add(r.nudge.nudge_id)
                acted = events_pb2.NUDGE_ACTION_ACTED in r.feedback
                when = datetime.fromtimestamp(r.nudge.create_time.ToMicroseconds() / 1e6, UTC)
                value = (
                    f"{r.outcome.value:.0f} steps in the next 30 min"
                    if r.outcome.metric == "steps_30m"
                    else f"{r.outcome.metric} = {r.outcome.value:g}"
                )
                self.note(
                    person,
                    "outcome",
                    f"{r.nudge.nudge_type} at {when:%H:%M} "
                    f"({'acted on' if acted else 'not acted on'}): {value}, measured from the timeline",
                )
        return pending

    def _merged_so_far(self) -> None:
        for person in self.people:
            counts = ", ".join(f"{d.label} {d.accepted}" for d in person.devices.values())
            total = sum(d.accepted for d in person.devices.values())
            self.note(person, "merge", f"{total} events merged so far ({counts})")

    async def _profile_moment(self, person: PersonRun) -> None:
        """On the phone the person sets a study goal and leaves a lesson half done; the
        desktop's open watch stream shows it."""
        phone, desktop = person.profiles["phone"], person.profiles["desktop"]
        began = time.perf_counter()

        def edit(p: profiles_pb2.Profile) -> None:
            p.goals.daily_study_minutes = 30
            item = p.continuity_items.add(
                app="lingo",
                item_id="spanish-12",
                title="Spanish, lesson 12",
                position="card=18",
                progress=0.6,
                device_id=person.devices["phone"].creds.device_id,
            )
            item.update_time.FromMicroseconds(self.clock.now_us())

        phone.edit(edit)
        try:
            await desktop.wait_for(
                lambda p: any(i.item_id == "spanish-12" for i in p.continuity_items), timeout_s=10
            )
            person.profile_latency_ms = (time.perf_counter() - began) * 1000
            self.note(
                person,
                "profile",
                f"phone set a 30-minute study goal and left 'Spanish, lesson 12' at 60%; the "
                f"desktop had it {person.profile_latency_ms:.0f} ms later",
            )
        except TimeoutError:
            self.note(person, "profile", "the desktop did not see the phone's edit within 10 s")

    async def _consent_moment(self, person: PersonRun) -> None:
        """The person withdraws behavior tracking on the phone; the desktop learns it live."""
        phone = person.devices["phone"]
        desktop = person.devices["desktop"]
        began = time.perf_counter()
        person.consent_withdrawn_us = self.clock.now_us()
        before = sum(d.agent.tracker.stats().dropped_no_consent for d in person.devices.values())
        await phone.consent.update(common_pb2.CONSENT_CATEGORY_BEHAVIOR, False, "demo")
        for _ in range(200):
            if not desktop.consent.allows(common_pb2.CONSENT_CATEGORY_BEHAVIOR):
                person.consent_seen_on_desktop_ms = (time.perf_counter() - began) * 1000
                break
            await asyncio.sleep(0.01)
        person.dropped_on_device_after = -before
        self.note(
            person,
            "consent",
            "withdrew behavior tracking on the phone"
            + (
                f"; the desktop stopped recording {person.consent_seen_on_desktop_ms:.0f} ms later"
                if person.consent_seen_on_desktop_ms is not None
                else ""
            ),
        )


async def _delivered(bridge: Bridge, before: list[int]) -> None:
    """Return once every connected link of the bridge has handled a notification more than
    `before` counted (or after DELIVERY_TIMEOUT_S of real time: a link may have dropped)."""
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while time.monotonic() < deadline and any(  # noqa: ASYNC110 - the bridge's counters, no event
        link.stats.connected and link.stats.notifications <= n
        for link, n in zip(bridge.links, before, strict=True)
    ):
        await asyncio.sleep(_DELIVERY_POLL_S)

"""The demo world: a real server on loopback and, per person, a phone, a desktop and a
wearable bridge, all talking to it through the public API, in accelerated time.

Only the very first step uses the admin path (what `pulsesync users add` and `pulsesync
devices pair-code` do): everything after it goes through gRPC and the agent SDKs, exactly as
an app would use them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Final, TypeVar

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from pulsesync.edge_agent.agent import Agent
from pulsesync.edge_agent.ble.bridge import Bridge, BridgeConfig
from pulsesync.edge_agent.ble.bumble_backend import VirtualAir
from pulsesync.edge_agent.ble.emulation import Footpod, HeartRateStrap
from pulsesync.edge_agent.ble.physiology import HeartModel, StrideModel
from pulsesync.edge_agent.client import Credentials, open_channel, pair
from pulsesync.edge_agent.clock import ScaledClock
from pulsesync.edge_agent.config import AgentSettings
from pulsesync.edge_agent.consent_sync import SyncedConsent
from pulsesync.edge_agent.profiles import ProfileSync
from pulsesync.server.app import running_server
from pulsesync.server.config import ServerConfig
from pulsesync.server.demo.persona import Doing, Persona, PersonaTrack
from pulsesync.server.identity import IdentityStore
from pulsesync.server.nudges.catalog import load_catalog
from pulsesync.server.storage.db import Database
from pulsesync.timeutil import US_PER_MIN
from pulsesync.timeutil import timestamp as _ts
from pulsesync.v1 import (
    common_pb2,
    devices_pb2,
    devices_pb2_grpc,
    events_pb2,
    ingest_pb2,
    nudges_pb2,
    nudges_pb2_grpc,
    privacy_pb2,
    privacy_pb2_grpc,
    profiles_pb2,
    timeline_pb2,
    timeline_pb2_grpc,
)

log = logging.getLogger(__name__)

KIND_LABEL: Final = {
    common_pb2.DEVICE_KIND_PHONE: "phone",
    common_pb2.DEVICE_KIND_DESKTOP: "desktop",
    common_pb2.DEVICE_KIND_WEARABLE_BRIDGE: "wearable",
}
NAMES: Final = ("ada", "grace", "alan", "edsger", "barbara", "donald", "frances", "ken")
# The wearable's sensors notify once per this many simulated seconds: a real strap sends
# every second, which at a thousandfold speed-up would only burn the demo's CPU. It stays
# under the bridge's MAX_CADENCE_GAP_S, beyond which no steps are integrated from cadence.
SENSOR_TICK_S: Final = 4.0
# Real seconds between the server's nudge decision ticks (a few simulated minutes at the
# default speed, so scheduled decision points land close to their time).
NUDGE_TICK_S: Final = 0.25
# How long the end of the period waits for the server to measure the outcomes due in it.
OUTCOME_WAIT_S: Final = 60.0
# Where in the simulated period the scripted moments happen (fractions of it).
PROFILE_EDIT_AT: Final = 0.72
CONSENT_WITHDRAW_AT: Final = 0.88

# How often the pacer looks at the event loop, and the lateness it forgives (a timer is never
# exactly on time). See PacedClock.
PACE_TICK_S: Final = 0.01
PACE_SLACK_S: Final = 0.002
# How long a sensor tick waits for the bridge to have its readings (a link that is down
# delivers nothing), and how often it looks.
DELIVERY_TIMEOUT_S: Final = 2.0
_DELIVERY_POLL_S: Final = 0.0005
_MIN_WAIT_S: Final = 0.001  # a sleeper waiting out a hold wakes at most this often

Say = Callable[[int, str, str], None]


class PacedClock(ScaledClock):
    """The demo's accelerated clock, held still while the world lags behind it.

    The whole world (server, agents, sensors) shares one event loop. At a thousandfold speed a
    loop that falls 50 ms behind, because the machine is busy, lets 50 simulated seconds pass
    unlived: sensors miss their ticks, batches arrive minutes of simulated time after they
    were sent (and look skewed into the future), calls meet their deadlines with work queued.
    So the demo holds this clock for as long as the loop was late (see `DemoWorld._pace`): the
    simulated period then passes only as fast as the machine can live it, and a busy machine
    gives the same run, only longer. (The wearable's readings are stamped with their sensor
    tick's moment besides, see `DemoWorld._wearable`.)
    """

    def __init__(self, speed: float, start_us: int) -> None:
        super().__init__(speed, start_us)
        self._held_ns = 0  # the length of holds that have ended
        self._hold_from_ns = 0  # the current (or last) hold
        self._hold_until_ns = 0

    def hold(self, seconds: float) -> None:
        """Stop the clock for `seconds` of real time from now (added to a hold in progress)."""
        now = time.monotonic_ns()
        if now < self._hold_until_ns:
            self._hold_until_ns += int(seconds * 1e9)
            return
        self._held_ns += self._hold_until_ns - self._hold_from_ns
        self._hold_from_ns, self._hold_until_ns = now, now + int(seconds * 1e9)

    def _elapsed_us(self) -> float:
        """Real time since the start, less the holds: the clock never goes back."""
        now = time.monotonic_ns()
        holding = min(max(now - self._hold_from_ns, 0), self._hold_until_ns - self._hold_from_ns)
        return (now - self._real0_ns - self._held_ns - holding) / 1000

    async def sleep_until(self, target_us: int) -> None:
        """Sleep until the clock reads target_us, however long it is held meanwhile."""
        while (remaining_us := target_us - self.now_us()) > 0:  # noqa: ASYNC110 - a clock, no event
            await asyncio.sleep(max(remaining_us / self.speed / 1e6, _MIN_WAIT_S))


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What to simulate and how fast."""

    users: int = 1
    start_hour: float = 6.0  # local (UTC) time of day the simulated period starts
    hours: float = 18.0
    wall_seconds: float = 90.0
    out_dir: Path = Path("pulsesync-demo")
    seed: int = 7
    # A nudge catalog override for the server (same format as PULSESYNC_NUDGE_CATALOG).
    nudge_catalog: Path | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.users <= len(NAMES):
            raise ValueError(f"--users must be 1..{len(NAMES)}")
        if not 0 < self.hours <= 72:
            raise ValueError("--hours must be in (0, 72]")
        if not 0 <= self.start_hour < 24:
            raise ValueError("--start-hour must be in [0, 24)")
        if self.wall_seconds < 5:
            raise ValueError("--wall-seconds must be at least 5")


@dataclass(slots=True)
class Happening:
    """Something worth showing, at a simulated time."""

    t_us: int
    user: str
    what: str  # "nudge", "feedback", "profile", "consent", "merge", "privacy"
    text: str


@dataclass(slots=True)
class DeviceRun:
    label: str
    kind: int
    creds: Credentials
    state_dir: Path
    consent: SyncedConsent
    agent: Agent = field(init=False)
    accepted: int = 0
    refused_for_consent: int = 0


@dataclass(slots=True)
class NudgeSeen:
    nudge: nudges_pb2.Nudge
    device: str
    shown_us: int
    acted: bool


@dataclass(slots=True)
class PersonRun:
    """One simulated person's devices and what the demo observed of them."""

    persona: Persona
    devices: dict[str, DeviceRun] = field(default_factory=dict)
    profiles: dict[str, ProfileSync] = field(default_factory=dict)
    nudges: list[NudgeSeen] = field(default_factory=list)
    sessions: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    profile_latency_ms: float | None = None
    consent_withdrawn_us: int | None = None
    consent_seen_on_desktop_ms: float | None = None
    dropped_on_device_after: int = 0
    refused_on_server_after: int = 0
    # Collected through the API at the end, for the report.
    timeline: list[events_pb2.TimelineEvent] = field(default_factory=list)
    buckets: list[timeline_pb2.ActivityBucket] = field(default_factory=list)
    nudge_records: list[nudges_pb2.NudgeRecord] = field(default_factory=list)
    summary: privacy_pb2.GetPrivacySummaryResponse | None = None
    export_files: dict[str, int] = field(default_factory=dict)
    receipt: privacy_pb2.DeletionReceipt | None = None
    erased_token_refused: bool = False
    device_names: dict[str, str] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    outcomes_shown: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.persona.name

    def metadata(self, label: str) -> tuple[tuple[str, str], ...]:
        return self.devices[label].creds.metadata


@dataclass(slots=True)
class DemoResult:
    options: DemoOptions
    start_us: int
    end_us: int
    people: list[PersonRun]
    happenings: list[Happening]
    wall_seconds: float
    report: Path | None = None


def _period(options: DemoOptions) -> tuple[int, int]:
    """A past period (the clock may not run ahead of the host's): the most recent day whose
    `start_hour` plus `hours` ended at least an hour ago."""
    now = datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    start = day + timedelta(hours=options.start_hour)
    while start + timedelta(hours=options.hours) > now - timedelta(hours=1):
        start -= timedelta(days=1)
    start_us = int(start.timestamp() * 1_000_000)
    return start_us, start_us + int(options.hours * 3600 * 1_000_000)


class DemoWorld:
    """Builds and runs the world; `say` receives happenings as they happen."""

    def __init__(self, options: DemoOptions, say: Say | None = None) -> None:
        self.options = options
        self.start_us, self.end_us = _period(options)
        speed = options.hours * 3600 / options.wall_seconds
        self.clock = PacedClock(speed, self.start_us)
        self.rng = random.Random(options.seed)
        self.happenings: list[Happening] = []
        self._say = say
        self.people: list[PersonRun] = []
        self.address = ""
        self.progress: Callable[[int], None] = lambda _t: None

    def note(self, person: PersonRun, what: str, text: str) -> None:
        h = Happening(self.clock.now_us(), person.name, what, text)
        self.happenings.append(h)
        if self._say is not None:
            self._say(h.t_us, f"{person.name} · {what}", text)

    # -- the run -------------------------------------------------------------------------------
    async def _pace(self) -> None:
        """Hold the clock for as long as the event loop runs late (see PacedClock)."""
        while True:
            before = time.monotonic()
            await asyncio.sleep(PACE_TICK_S)
            late = time.monotonic() - before - PACE_TICK_S
            if late > PACE_SLACK_S:
                self.clock.hold(late)

    async def run(self) -> DemoResult:
        began = time.monotonic()
        pacer = asyncio.create_task(self._pace(), name="demo-pacer")
        try:
            return await self._run(began)
        finally:
            pacer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pacer

    async def _run(self, began: float) -> DemoResult:
        with tempfile.TemporaryDirectory(prefix="pulsesync-demo-") as tmp:
            root = Path(tmp)
            config = ServerConfig(
                port=0,
                data_dir=root / "server",
                grace_seconds=1.0,
                extra=self._server_extra(),
            )
            async with (
                running_server(config, clock=self.clock) as server,
                AsyncExitStack() as stack,
            ):
                self.address = server.address
                for i in range(self.options.users):
                    persona = Persona(NAMES[i], self._day_start(), seed=self.options.seed + i)
                    person = PersonRun(persona)
                    self.people.append(person)
                    await self._set_up(person, root / persona.name, config, stack)
                async with asyncio.TaskGroup() as tg:
                    for person in self.people:
                        person.tasks = [tg.create_task(c) for c in self._background(person)]
                    await self._play()
                    for person in self.people:
                        await self._finish(person)
        return DemoResult(
            self.options,
            self.start_us,
            self.end_us,
            self.people,
            self.happenings,
            time.monotonic() - began,
        )

    def _server_extra(self) -> dict[str, str]:
        extra = {"nudges.tick_seconds": str(NUDGE_TICK_S), "nudges.seed": str(self.options.seed)}
        if self.options.nudge_catalog is not None:
            extra["nudge_catalog"] = str(self.options.nudge_catalog)
        return extra

    def _day_start(self) -> int:
        return self.start_us - int(self.options.start_hour * 3600 * 1_000_000)

    # -- set-up: pairing, consent, agents --------------------------------------------------------
    async def _set_up(
        self, person: PersonRun, home: Path, config: ServerConfig, stack: AsyncExitStack
    ) -> None:
        # The admin bootstrap, as `pulsesync users add` and `devices pair-code` do it.
        async with await Database.open(config.database) as db:
            admin = IdentityStore(db, self.clock)
            user_id = await admin.add_user(person.name)
            first_code, _ = await admin.create_pairing_code(user_id)

        kinds = [
            ("phone", common_pb2.DEVICE_KIND_PHONE, f"{person.name.title()}'s phone"),
            ("desktop", common_pb2.DEVICE_KIND_DESKTOP, f"{person.name.title()}'s desktop"),
            (
                "wearable",
                common_pb2.DEVICE_KIND_WEARABLE_BRIDGE,
                f"{person.name.title()}'s strap bridge",
            ),
        ]
        code = first_code
        for label, kind, name in kinds:
            creds = await pair(self.address, code, kind, name)
            person.device_names[creds.device_id] = label
            state = home / label
            consent = SyncedConsent(state, creds)
            settings = AgentSettings(uplink_linger_s=0.05, tracker_linger_s=0.02)
            device = DeviceRun(label, kind, creds, state, consent)
            # The whole world runs on the simulated clock, the server's included, so the
            # devices' real clock (which stamps sent_time) is that clock too.
            device.agent = Agent(
                state / "outbox.db",
                creds,
                consent=consent,
                settings=settings,
                clock=self.clock,
                uplink_clock=self.clock,
                on_ack=self._counter(person, device),
            )
            person.devices[label] = device
            if label == "phone":
                # The person agrees to every category on first launch of the phone app; the
                # other devices learn it from the server's consent stream.
                for category in (
                    common_pb2.CONSENT_CATEGORY_BEHAVIOR,
                    common_pb2.CONSENT_CATEGORY_ACTIVITY,
                    common_pb2.CONSENT_CATEGORY_PERSONALIZATION,
                    common_pb2.CONSENT_CATEGORY_SYNC,
                ):
                    await consent.update(category, True, "demo")
                code = await self._mint_code(creds)
            elif label == "desktop":
                code = await self._mint_code(creds)
            await stack.enter_async_context(device.agent)
        for label in ("phone", "desktop"):
            d = person.devices[label]
            person.profiles[label] = ProfileSync(
                d.state_dir / "profile",
                d.creds.device_id,
                wall_ms=lambda: self.clock.now_us() // 1000,
            )
        self.note(
            person,
            "devices",
            "paired a phone, a desktop and a wearable bridge; consent granted on the phone",
        )

    async def _mint_code(self, creds: Credentials) -> str:
        """A paired device mints the next device's pairing code (CreatePairingCode)."""
        async with open_channel(creds.server) as channel:
            resp = await devices_pb2_grpc.DeviceServiceStub(channel).CreatePairingCode(
                devices_pb2.CreatePairingCodeRequest(), metadata=creds.metadata, timeout=5
            )
        return resp.pairing_code

    def _counter(
        self, person: PersonRun, device: DeviceRun
    ) -> Callable[[ingest_pb2.UploadResponse], None]:
        def on_ack(ack: ingest_pb2.UploadResponse) -> None:
            device.accepted += ack.accepted_count
            refused = sum(
                1
                for r in ack.rejected
                if r.reason == ingest_pb2.REJECTION_REASON_CONSENT_NOT_GRANTED
            )
            device.refused_for_consent += refused
            if person.consent_withdrawn_us is not None:
                person.refused_on_server_after += refused

        return on_ack

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
                    tick_us = start + int(n * SENSOR_TICK_S * 1_000_000)
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

    def _history_range(self) -> tuple[timestamp_pb2.Timestamp, timestamp_pb2.Timestamp]:
        """The simulated period with an hour on each side (late uploads, outcome windows)."""
        hour = 3600 * 1_000_000
        return _ts(self.start_us - hour), _ts(self.end_us + hour)

    async def _nudge_history(
        self, channel: grpc.aio.Channel, md: tuple[tuple[str, str], ...]
    ) -> list[nudges_pb2.NudgeRecord]:
        """The person's nudges with feedback and outcomes (ListNudges, every page)."""
        nudges = nudges_pb2_grpc.NudgeServiceStub(channel)
        start, end = self._history_range()

        async def page(token: str) -> tuple[list[nudges_pb2.NudgeRecord], str]:
            resp = await nudges.ListNudges(
                nudges_pb2.ListNudgesRequest(
                    start_time=start, end_time=end, page_size=200, page_token=token
                ),
                metadata=md,
                timeout=30,
            )
            return list(resp.nudges), resp.next_page_token

        return await _all_pages(page)

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

    # -- the end: drain, look, export, erase -------------------------------------------------------
    async def _finish(self, person: PersonRun) -> None:
        for label, (app, sid, began) in list(person.sessions.items()):
            person.devices[label].agent.tracker.session_end(app, sid, (self.end_us - began) / 1e6)
        person.sessions.clear()
        for d in person.devices.values():
            await d.agent.drain(timeout_s=30)
        person.dropped_on_device_after += sum(
            d.agent.tracker.stats().dropped_no_consent for d in person.devices.values()
        )
        if person.consent_withdrawn_us is not None:
            self.note(
                person,
                "consent",
                f"after withdrawal: {person.dropped_on_device_after} behavior events never left "
                f"the devices, {person.refused_on_server_after} in flight were refused by the "
                "server, none stored",
            )
        phone = person.devices["phone"]
        async with open_channel(phone.creds.server) as channel:
            md = phone.creds.metadata
            await self._collect(person, channel, md)
            await self._export(person, channel, md)
            # The apps close before the person erases their data (afterwards every token is
            # refused, which the apps would rightly report as "pair again").
            for task in person.tasks:
                task.cancel()
            await asyncio.gather(*person.tasks, return_exceptions=True)
            await self._erase(person, channel, md)

    async def _collect(
        self, person: PersonRun, channel: grpc.aio.Channel, md: tuple[tuple[str, str], ...]
    ) -> None:
        timeline = timeline_pb2_grpc.TimelineServiceStub(channel)
        start, end = self._history_range()

        async def events_page(token: str) -> tuple[list[events_pb2.TimelineEvent], str]:
            page = await timeline.ListEvents(
                timeline_pb2.ListEventsRequest(
                    start_time=start, end_time=end, page_size=1000, page_token=token
                ),
                metadata=md,
                timeout=30,
            )
            return list(page.events), page.next_page_token

        person.timeline = await _all_pages(events_page)
        summary = await timeline.SummarizeActivity(
            timeline_pb2.SummarizeActivityRequest(
                start_time=_ts(self.start_us), end_time=_ts(self.end_us), bucket=_dur(15 * 60)
            ),
            metadata=md,
            timeout=30,
        )
        person.buckets = list(summary.buckets)
        person.nudge_records = await self._nudge_history(channel, md)
        privacy = privacy_pb2_grpc.PrivacyServiceStub(channel)
        person.summary = await privacy.GetPrivacySummary(
            privacy_pb2.GetPrivacySummaryRequest(), metadata=md, timeout=30
        )
        kinds = Counter(person.device_names.get(e.device_id, "?") for e in person.timeline)
        self.note(
            person,
            "timeline",
            f"merged timeline: {len(person.timeline)} events ("
            + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
            + f"), {len(person.nudge_records)} nudges with outcomes",
        )

    async def _export(
        self, person: PersonRun, channel: grpc.aio.Channel, md: tuple[tuple[str, str], ...]
    ) -> None:
        out = self.options.out_dir / f"export-{person.name}"
        out.mkdir(parents=True, exist_ok=True)
        privacy = privacy_pb2_grpc.PrivacyServiceStub(channel)
        files: dict[str, int] = {}
        handles: dict[str, BinaryIO] = {}
        try:
            async for chunk in privacy.ExportData(
                privacy_pb2.ExportDataRequest(), metadata=md, timeout=120
            ):
                f = handles.get(chunk.file_name)
                if f is None:
                    f = handles[chunk.file_name] = (out / chunk.file_name).open("wb")
                f.write(chunk.chunk)
                files[chunk.file_name] = files.get(chunk.file_name, 0) + len(chunk.chunk)
        finally:
            for f in handles.values():
                f.close()
        person.export_files = files
        self.note(
            person,
            "privacy",
            f"exported {len(files)} files ({sum(files.values()) / 1024:.0f} KiB) to {out}",
        )

    async def _erase(
        self, person: PersonRun, channel: grpc.aio.Channel, md: tuple[tuple[str, str], ...]
    ) -> None:
        privacy = privacy_pb2_grpc.PrivacyServiceStub(channel)
        resp = await privacy.EraseData(
            privacy_pb2.EraseDataRequest(confirmation="ERASE"), metadata=md, timeout=60
        )
        person.receipt = resp.receipt
        try:
            await devices_pb2_grpc.DeviceServiceStub(channel).ListDevices(
                devices_pb2.ListDevicesRequest(), metadata=md, timeout=5
            )
        except grpc.aio.AioRpcError as e:
            person.erased_token_refused = e.code() == grpc.StatusCode.UNAUTHENTICATED
        deleted = sum(resp.receipt.deleted_counts.values())
        self.note(
            person,
            "privacy",
            f"erased: {deleted} rows deleted, keys destroyed, receipt {resp.receipt.receipt_id[:12]}…; "
            f"the phone's token is {'refused' if person.erased_token_refused else 'STILL ACCEPTED'}",
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


T = TypeVar("T")
# A person's day is a few tens of thousands of events: 1000 pages of 1000 is far beyond it,
# and bounds the loop should a server keep returning a next page.
MAX_PAGES: Final = 1000


async def _all_pages(fetch: Callable[[str], Awaitable[tuple[list[T], str]]]) -> list[T]:
    """Every item of a paginated list RPC (fetch(token) -> (items, next_page_token))."""
    items: list[T] = []
    token = ""
    for _ in range(MAX_PAGES):
        page, token = await fetch(token)
        items.extend(page)
        if not token:
            return items
    raise RuntimeError(f"more than {MAX_PAGES} pages: the server keeps returning a next page")


def _dur(seconds: int) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromSeconds(seconds)
    return d

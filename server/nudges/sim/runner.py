"""Drive a real server with simulated people: pairing, uploads, nudge streams and feedback.

Each arm starts `running_server` on 127.0.0.1:0 with a fake clock and a manual nudge
scheduler, pairs every person's devices through the real PairDevice RPC, keeps a real
SubscribeNudges stream open per phone and desktop, uploads each device's events every
`BLOCK_MIN` simulated minutes through the real IngestService.UploadBatch RPC, then moves the
clock and runs one nudge tick. Nudges arrive over the streams; the simulated person responds
(or not) and the device reports feedback through RecordNudgeFeedback.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import grpc
import numpy as np
from google.protobuf import duration_pb2

from pulsesync.server.app import running_server
from pulsesync.server.clock import FakeClock
from pulsesync.server.config import NudgeConfig, ServerConfig
from pulsesync.server.nudges.catalog import load_catalog
from pulsesync.server.nudges.importlog import import_file, write_jsonl
from pulsesync.server.nudges.sim.behavior import (
    BASE_RESPONSE,
    Day,
    Person,
    burden_dose,
    context_multiplier,
    day_plan,
    expected_walk_steps,
    response_probability,
    response_walk,
)
from pulsesync.server.nudges.sim.trial import TRIAL
from pulsesync.server.nudges.training import (
    Evaluation,
    evaluate_candidate,
    logged_decisions,
    promote_if_better,
    train_candidate,
)
from pulsesync.timeutil import US_PER_MIN, US_PER_S, timestamp
from pulsesync.v1 import (
    common_pb2,
    devices_pb2,
    devices_pb2_grpc,
    events_pb2,
    ingest_pb2,
    ingest_pb2_grpc,
    nudges_pb2,
    nudges_pb2_grpc,
)

START: Final = int(datetime(2026, 1, 5, tzinfo=UTC).timestamp() * US_PER_S)  # a Monday

BLOCK_MIN: Final = 30  # upload and decide every half hour of simulated time
NUDGE_SERVICE: Final = "pulsesync.v1.NudgeService"
# The latency probe's load process: how long it may take to start, and to run at most.
LOAD_START_TIMEOUT_S: Final = 60.0
LOAD_MAX_S: Final = 600.0


# A policy setting that turns the sedentary trigger off (no one sits this long): decisions
# only at the schedule's times.
NO_SEDENTARY_TRIGGER: Final = "sedentary_trigger_min = 100000\n"


def fixed_catalog(schedule: Sequence[str]) -> str:
    """The fixed arm's catalog: a nudge at each of these local times (HH:MM), no triggers."""
    times = ", ".join(f'"{t}"' for t in schedule)
    return (
        f"[policy]\nschedule = [{times}]\ncold_start_send_probability = 1.0\n{NO_SEDENTARY_TRIGGER}"
    )


# The learned arm's settings (`learned_catalog`'s defaults; docs/nudges.md, "The learned arm",
# has the measurements behind each). Its cold start sends with LEARNED_TOP at decision points an
# hour apart through the band where the trial found its largest effect (`trial_focus`) and
# explores with 0.03 elsewhere, at most LEARNED_DAILY_CAP nudges a person-day, deciding only
# at its schedule's times (no sedentary trigger, as the fixed arm). Its budget, in nudges per
# person-day once a model is promoted (policy.daily_budget), is under the ~1.87 a day its cold
# start sends: a candidate sending more than the policy that logged its data gains less than
# the one-step estimate counts (each nudge lowers later responses). A type's predicted effect
# in a quarter of the day is scaled by n / (n + LEARNED_SUPPORT_SENDS), n its nudges there in
# the training log (policy.support_sends).
LEARNED_BUDGET: Final = 1.7
LEARNED_COLD_START: Final = "focused"
LEARNED_TOP: Final = 0.9
LEARNED_DAILY_CAP: Final = 2
LEARNED_SEDENTARY_TRIGGER: Final = False
LEARNED_SUPPORT_SENDS: Final = 50.0


def slot_effects(schedule_min: Sequence[int]) -> list[float]:
    """HeartSteps' steps difference at each of its five daily slots (sim/trial.TRIAL), one per
    decision point of a five-point schedule (ValueError for another number of points)."""
    effects = [next(r.point for r in TRIAL if r.name == f"diff_slot{i}") for i in range(1, 6)]
    if len(schedule_min) != len(effects):
        raise ValueError(
            f"the trial has {len(effects)} daily slots, the schedule {len(schedule_min)}"
        )
    return effects


def trial_prior(
    schedule_min: Sequence[int], top: float = 0.6, floor: float = 0.03
) -> tuple[float, dict[str, float]]:
    """A cold start by local time from HeartSteps' per-slot effects (sim/trial.TRIAL).

    Around each of the five daily decision points (schedule_min, local minutes), a send
    probability in proportion to the trial's steps difference at that slot: `top`
    (HeartSteps' 0.6) at the strongest, never below `floor` (where the trial found no effect:
    a little exploration, not none). Each band starts midway from the previous point.
    Returns (the probability before the first band, {"HH:MM": probability}) for the catalog's
    cold_start_send_probability and cold_start_by_local_time.
    """
    effects = slot_effects(schedule_min)
    best = max(effects)
    probs = [round(max(floor, top * e / best), 3) for e in effects]
    bands = {}
    for prev, point, prob in zip(schedule_min, schedule_min[1:], probs[1:], strict=False):
        start = (prev + point) // 2
        bands[hhmm(start)] = prob
    return probs[0], bands


def trial_focus(
    schedule_min: Sequence[int], spacing_min: int, top: float = 0.6, floor: float = 0.03
) -> tuple[tuple[int, ...], float, dict[str, float]]:
    """Decision points and a cold start focused on the slot where the trial found its effect.

    HeartSteps' steps difference is largest at one of its five daily slots (+50 at the third
    against +22 and +23 beside it). Around that slot (its band: from midway after the
    previous decision point to midway before the next, as in `trial_prior`), decision points
    as close as the global cooldown allows (`spacing_min` apart, centred on the slot); the
    cold start sends with `top` (HeartSteps' 0.6) in that band and explores with `floor`
    elsewhere. Returns (the whole schedule in local minutes, the probability before the
    band, {"HH:MM": probability}) for the catalog's schedule, cold_start_send_probability and
    cold_start_by_local_time.
    """
    points = sorted(schedule_min)
    effects = slot_effects(points)
    if spacing_min <= 0:
        raise ValueError("spacing_min must be positive")
    best = effects.index(max(effects))
    centre = points[best]
    start = (points[best - 1] + centre) // 2 if best > 0 else 0
    end = (centre + points[best + 1]) // 2 if best + 1 < len(points) else 1440
    extra = {
        m
        for k in range(-(1440 // spacing_min), 1440 // spacing_min + 1)
        if start <= (m := centre + k * spacing_min) < end
    }
    return (
        tuple(sorted(set(points) | extra)),
        floor,
        {hhmm(start): top, hhmm(end): floor} if end < 1440 else {hhmm(start): top},
    )


def hhmm(minute: int) -> str:
    """A local minute of the day as HH:MM (the catalog's form)."""
    return f"{minute // 60:02d}:{minute % 60:02d}"


def learned_catalog(
    daily_budget: float | None = LEARNED_BUDGET,
    exploration_floor: float = 0.01,
    cold_start: str = LEARNED_COLD_START,
    top: float = LEARNED_TOP,
    evaluation_days: float | None = None,
    daily_cap: int | None = LEARNED_DAILY_CAP,
    sedentary_trigger: bool = LEARNED_SEDENTARY_TRIGGER,
    support_sends: float | None = LEARNED_SUPPORT_SENDS,
) -> str:
    """The learned arm's catalog: its cold start, exploration floor, budget and caps.

    The cold start explores where the trial found its effect (a deployment that knows the
    trial starts from it) and a 1% exploration floor per option once a model is promoted: in
    this simulator every nudge received lowers later responses (the dose-based burden,
    sim/behavior.py), so sends at moments the trial found useless cost responsiveness the
    model's later nudges would use. cold_start "focused" (the default): `trial_focus`'s
    decision points and bands; "proportional": the five daily points with `trial_prior`'s
    bands. daily_budget None: the catalog's (policy.daily_budget). `top`: the send
    probability where the trial's effect is largest (HeartSteps' 0.6; each cold start scales
    the rest from it).
    evaluation_days None: the catalog's (policy.evaluation_days; 0 scores every day).
    daily_cap None: the catalog's (policy.daily_cap, nudges per person per day).
    sedentary_trigger False: decisions only at the schedule's times, as the fixed arm's.
    support_sends None: the catalog's (policy.support_sends).
    docs/nudges.md, "The learned arm", has the measurements behind each value.
    """
    policy = load_catalog().policy
    schedule = ""
    if cold_start == "focused":
        points, before, bands = trial_focus(
            policy.schedule_min, policy.global_cooldown_us // US_PER_MIN, top
        )
        schedule = "schedule = [" + ", ".join(f'"{hhmm(m)}"' for m in points) + "]\n"
    elif cold_start == "proportional":
        before, bands = trial_prior(policy.schedule_min, top)
    else:
        raise ValueError(f"cold_start must be 'proportional' or 'focused', not {cold_start!r}")
    settings = "" if daily_budget is None else f"daily_budget = {daily_budget}\n"
    if evaluation_days is not None:
        settings += f"evaluation_days = {evaluation_days}\n"
    if daily_cap is not None:
        settings += f"daily_cap = {daily_cap}\n"
    if not sedentary_trigger:
        settings += NO_SEDENTARY_TRIGGER
    if support_sends is not None:
        settings += f"support_sends = {support_sends}\n"
    table = ", ".join(f'"{t}" = {p}' for t, p in bands.items())
    return (
        f"[policy]\n{schedule}{settings}exploration_floor = {exploration_floor}\n"
        f"cold_start_send_probability = {before}\n"
        f"cold_start_by_local_time = {{ {table} }}\n"
    )


_LEARNED_CATALOG: Final = learned_catalog()
ARM_CATALOGS: Final = {
    "none": "[policy]\ncold_start_send_probability = 0.0\n",
    "randomized": "",
    "fixed": fixed_catalog(["10:00", "14:00", "17:30"]),
    "learned": _LEARNED_CATALOG,
    # The learned arm's cold start kept all along (no training): the policy the off-policy
    # estimate at promotion compares the candidate with, so its simulated truth.
    "cold_start": _LEARNED_CATALOG,
}


@dataclass(slots=True)
class _Device:
    device_id: str
    token: str
    kind: int
    seq: int = 0

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)


@dataclass(slots=True)
class ArmResult:
    """What one arm produced: the server's decision log plus the simulator's truth."""

    name: str
    decisions: list[
        tuple[Any, ...]
    ]  # (user index, minute, version, options, chosen, prob, outcome, nudge type)
    added: np.ndarray  # (people, minutes) steps added by responses
    baseline_steps: float
    nudges_sent: dict[int, int]  # day -> count
    delivered: int
    latencies: list[float]
    evaluation: dict[str, Any] | None = None
    promote_minute: int | None = None
    upload_s: float = 0.0
    events: int = 0
    # Per delivered nudge: (person, minute, type, response probability, context multiplier).
    responses: list[tuple[int, int, str, float, float]] = field(default_factory=list)
    # Per decision point, (person, minute) -> {nudge type: steps that type would have caused
    # there in expectation}: its response probability at that moment (the person's dose just
    # before, the device the server routed that type to) times the mean act. "none" causes 0.
    one_step: dict[tuple[int, int], dict[str, float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _on_active(d: Day, minute: int, kind: int) -> bool:
    """Whether a nudge shown on a device of this kind meets the person where they are (a phone
    also counts when no device is in use)."""
    want = 1 if kind == common_pb2.DEVICE_KIND_PHONE else 2
    in_use = int(d.device[min(minute, 1439)])
    return in_use == want or (in_use == 0 and want == 1)


def true_gain(result: ArmResult, evaluation: Evaluation, users: Mapping[int, int]) -> float | None:
    """The exact value of what an off-policy estimate is of: over the decisions it scored,
    the mean of sum_a (candidate pi - current pi)(a) x the steps a causes there in expectation
    (`ArmResult.one_step`); None when a scored decision is not one of this arm's (imported)."""
    scored = evaluation.scored
    if scored is None or not scored.decisions:
        return None
    total = 0.0
    for row, d in enumerate(scored.decisions):
        caused = result.one_step.get(
            (users.get(d.user_id, -1), (d.decision_us - START) // US_PER_MIN)
        )
        if caused is None:
            return None
        diff = scored.candidate[row] - scored.current[row]
        total += sum(float(diff[j]) * caused.get(a, 0.0) for j, a in enumerate(scored.actions))
    return total / len(scored.decisions)


def _write_catalog(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _events(
    d: Day, added: np.ndarray, day: int, lo: int, hi: int, kind: int
) -> list[events_pb2.Event]:
    out = []
    for m in range(lo, hi):
        t_us = START + (day * 1440 + m + 1) * US_PER_MIN
        if kind == common_pb2.DEVICE_KIND_WEARABLE_BRIDGE:
            steps = int(d.steps[m] + added[day * 1440 + m])
            if steps > 0:
                out.append(events_pb2.Event(event_id=str(uuid.uuid4()), device_time=timestamp(t_us), steps=events_pb2.Steps(
                    sensor_id="strap", count=steps, interval=duration_pb2.Duration(seconds=60),
                    source=events_pb2.STEPS_SOURCE_COUNTER)))  # fmt: skip
            if m % 10 == 0 and (steps > 0 or d.device[m]):
                bpm = 62 + steps // 3
                rr = [60000.0 / bpm + j for j in (-12.0, 9.0, -7.0, 11.0)]
                out.append(events_pb2.Event(event_id=str(uuid.uuid4()), device_time=timestamp(t_us),
                           heart_rate=events_pb2.HeartRate(sensor_id="strap", bpm=bpm, rr_intervals_ms=rr)))  # fmt: skip
        elif m % 10 == 0:
            want = 1 if kind == common_pb2.DEVICE_KIND_PHONE else 2
            if d.device[m] == want:
                out.append(events_pb2.Event(event_id=str(uuid.uuid4()), device_time=timestamp(t_us),
                           feature_use=events_pb2.FeatureUse(app=d.app[m], feature="main")))  # fmt: skip
    return out


async def _pair(
    channel: grpc.aio.Channel, srv: Any, name: str, kinds: Sequence[int]
) -> tuple[int, list[_Device]]:
    ids = srv.app.identity
    user_id = await ids.add_user(name)
    for cat in (
        common_pb2.CONSENT_CATEGORY_BEHAVIOR,
        common_pb2.CONSENT_CATEGORY_ACTIVITY,
        common_pb2.CONSENT_CATEGORY_PERSONALIZATION,
    ):
        await srv.app.consent.set(user_id, cat, True, device_id="simulator")
    stub = devices_pb2_grpc.DeviceServiceStub(channel)
    devices = []
    for kind in kinds:
        code, _ = await ids.create_pairing_code(user_id)
        resp = await stub.PairDevice(
            devices_pb2.PairDeviceRequest(
                pairing_code=code,
                device_name=f"{name}-{kind}",
                kind=kind,  # type: ignore[arg-type]
            ),
            timeout=10,
        )
        devices.append(_Device(resp.device.device_id, resp.token, kind))
    return user_id, devices


async def run_arm(
    name: str,
    persons: Sequence[Person],
    days: int,
    seed: int,
    workdir: Path,
    *,
    train_day: int = 10,
    retrain_every: int = 7,
    latency_probe: int = 0,
    base_response: Mapping[str, float] = BASE_RESPONSE,
    catalog_text: str | None = None,
    prior_log: Path | None = None,
    export_log: Path | None = None,
    promote_first: bool = False,
) -> ArmResult:
    """Simulate `days` days of `persons` under one policy arm; the log and the truth.

    catalog_text replaces the arm's catalog override (ARM_CATALOGS) when given. prior_log, a
    decision log file (importlog format), is imported before the first day and, in the learned
    arm, trained on, evaluated and promoted if better, as an operator starting a deployment
    from an earlier trial's log would. export_log receives this arm's own logged decisions in
    that format at the end, dated to end before START (an earlier deployment, for prior_log).
    promote_first: the learned arm promotes its first candidate whatever the gate says (a
    diagnostic: what the model adds once deployed, apart from whether the gate can show it);
    later candidates go through the gate as usual.
    """
    catalog = workdir / "catalog.toml"
    text = ARM_CATALOGS[name] if catalog_text is None else catalog_text
    await asyncio.to_thread(_write_catalog, catalog, text or "# defaults\n")
    clock = FakeClock(START)
    config = ServerConfig(port=0, data_dir=workdir, grace_seconds=0.5,
                          nudges=NudgeConfig(scheduler="manual", seed=seed, catalog=Path(catalog)))  # fmt: skip
    minutes = days * 1440 + 120
    added = np.zeros((len(persons), minutes), dtype=np.int64)
    sent: dict[int, int] = {}
    inbox: list[tuple[int, _Device, nudges_pb2.Nudge]] = []
    result = ArmResult(name, [], added, 0.0, sent, 0, [])
    async with (
        running_server(config, clock=clock) as srv,
        grpc.aio.insecure_channel(srv.address) as channel,
    ):
        engine = srv.servicers[NUDGE_SERVICE].engine
        # Every decision's latency (ticks and the probe), as the engine measured it.
        latencies: list[float] = []
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        nudge_stub = nudges_pb2_grpc.NudgeServiceStub(channel)
        users: list[int] = []
        devices: list[list[_Device]] = []
        for p in persons:
            kinds = [common_pb2.DEVICE_KIND_WEARABLE_BRIDGE, common_pb2.DEVICE_KIND_PHONE]
            if p.has_desktop:
                kinds.append(common_pb2.DEVICE_KIND_DESKTOP)
            uid, devs = await _pair(channel, srv, f"sim{p.index:03d}", kinds)
            users.append(uid)
            devices.append(devs)
        index_of = {u: i for i, u in enumerate(users)}
        kind_of = {dev.device_id: dev.kind for devs in devices for dev in devs}

        async def listen(i: int, dev: _Device) -> None:
            call = nudge_stub.SubscribeNudges(
                nudges_pb2.SubscribeNudgesRequest(), metadata=dev.metadata
            )
            async for resp in call:
                inbox.append((i, dev, resp.nudge))

        listeners = [
            asyncio.create_task(listen(i, d))
            for i, devs in enumerate(devices)
            for d in devs
            if d.kind != common_pb2.DEVICE_KIND_WEARABLE_BRIDGE
        ]
        for _ in range(1000):  # bounded: streams open within milliseconds on loopback
            if srv.app.sessions.connected_device_count() >= len(listeners):
                break
            await asyncio.sleep(0.01)
        # Per person: (dose just after the last delivered nudge, its minute); see burden().
        dose_at: dict[int, tuple[float, int]] = {}
        if prior_log is not None:
            summary = await import_file(srv.app.storage.nudges, prior_log, engine.catalog.actions)
            result.extra["prior"] = {"decisions": summary.stored, "people": summary.people}
            if name == "learned":
                await _learn(srv, engine, result, 0, promote_first, index_of)
        try:
            for day in range(days):
                plans = [day_plan(p, day, seed) for p in persons]
                result.baseline_steps += float(sum(int(pl.steps.sum()) for pl in plans))
                for lo in range(0, 1440, BLOCK_MIN):
                    hi = lo + BLOCK_MIN
                    t0 = time.perf_counter()
                    calls = []
                    for i, devs in enumerate(devices):
                        for dev in devs:
                            evs = _events(plans[i], added[i], day, lo, hi, dev.kind)
                            if not evs:
                                continue
                            for ev in evs:
                                dev.seq += 1
                                ev.seq = dev.seq
                            result.events += len(evs)
                            batch = ingest_pb2.EventBatch(
                                batch_id=dev.seq,
                                sent_time=timestamp(START + (day * 1440 + hi) * US_PER_MIN),
                                events=evs,
                            )
                            calls.append(
                                ingest.UploadBatch(
                                    ingest_pb2.UploadBatchRequest(batch=batch),
                                    metadata=dev.metadata,
                                    timeout=30,
                                )
                            )
                    clock.set_us(START + (day * 1440 + hi) * US_PER_MIN)
                    await asyncio.gather(*calls)
                    result.upload_s += time.perf_counter() - t0
                    if (
                        name == "learned"
                        and lo == 0
                        and day >= train_day
                        and (day - train_day) % retrain_every == 0
                    ):
                        await _learn(srv, engine, result, day * 1440, promote_first, index_of)
                    made = await engine.tick()
                    latencies.extend(d.latency_s for d in made)
                    for d in made:  # what each type would cause at each decision point
                        i, at = index_of[d.user_id], (d.decision_us - START) // US_PER_MIN
                        local, dose = at - day * 1440, burden_dose(dose_at.get(i), at)[0]
                        result.one_step[(i, at)] = {
                            kind: expected_walk_steps(kind) * response_probability(
                                persons[i], kind, plans[i], local, dose,
                                _on_active(plans[i], local, kind_of[engine.delivery.device_id(pk)]),
                                base_response,
                            )
                            for kind, pk in d.eligibility.device_for.items()
                        }  # fmt: skip
                    want = sum(1 for d in made if d.nudge is not None and d.nudge.device_id)
                    for d in made:
                        if d.nudge is not None:
                            sent[day] = sent.get(day, 0) + 1
                    for _ in range(2000):
                        if len(inbox) >= want:
                            break
                        await asyncio.sleep(0.001)
                    feedback = []
                    for i, dev, nudge in inbox:
                        minute = hi
                        abs_min = day * 1440 + minute
                        d = plans[i]
                        on_active = _on_active(d, minute, dev.kind)
                        dose, after = burden_dose(dose_at.get(i), abs_min)
                        dose_at[i] = (after, abs_min)
                        prob = response_probability(
                            persons[i], nudge.nudge_type, d, minute, dose, on_active,
                            base_response,
                        )  # fmt: skip
                        mult = context_multiplier(
                            persons[i], nudge.nudge_type, d, minute, dose, on_active
                        )
                        result.responses.append((i, abs_min, nudge.nudge_type, prob, mult))
                        rng = random.Random(f"resp-{seed}-{i}-{abs_min}-{nudge.nudge_type}")
                        acted = rng.random() < prob
                        actions = [events_pb2.NUDGE_ACTION_DELIVERED]
                        if on_active or rng.random() < 0.5:
                            actions.append(events_pb2.NUDGE_ACTION_OPENED)
                        if acted:
                            delay, dur, spm = response_walk(nudge.nudge_type, rng)
                            s = abs_min + delay
                            added[i, s : s + dur] += int(spm)
                            actions.append(events_pb2.NUDGE_ACTION_ACTED)
                        elif events_pb2.NUDGE_ACTION_OPENED in actions:
                            actions.append(events_pb2.NUDGE_ACTION_DISMISSED)
                        for a in actions:
                            feedback.append(nudge_stub.RecordNudgeFeedback(
                                nudges_pb2.RecordNudgeFeedbackRequest(nudge_id=nudge.nudge_id, action=a),
                                metadata=dev.metadata, timeout=10))  # fmt: skip
                        result.delivered += 1
                    inbox.clear()
                    await asyncio.gather(*feedback)
            # Let the last outcomes complete.
            clock.advance(3 * 3600)
            await engine.complete_outcomes(clock.now_us())
            if export_log is not None:
                # Whole weeks earlier (weekdays kept), ending a day before START.
                shift = -((days + 1 + 6) // 7) * 7 * 1440 * US_PER_MIN
                own = await logged_decisions(srv.app.storage.nudges)
                await asyncio.to_thread(write_jsonl, export_log, own, shift)
            if latency_probe:
                result.extra["probe"] = await _latency_probe(
                    srv, engine, users, devices, latency_probe, latencies
                )
        finally:
            for t in listeners:
                t.cancel()
            await asyncio.gather(*listeners, return_exceptions=True)
        result.latencies = latencies
        for d in await srv.app.storage.nudges.outcome_log():
            if d.outcome_complete:
                result.decisions.append(
                    (
                        index_of[d.user_id],
                        (d.decision_us - START) // US_PER_MIN,
                        d.policy_version,
                        d.options_json,
                        d.chosen,
                        d.probability,
                        d.outcome_steps,
                    )
                )
    return result


async def _learn(
    srv: Any,
    engine: Any,
    result: ArmResult,
    minute: int,
    promote_first: bool,
    users: Mapping[int, int],
) -> None:
    storage, catalog, registry = srv.app.storage.nudges, engine.catalog, engine.registry
    try:
        version = await train_candidate(storage, catalog, registry)
        evaluation = await evaluate_candidate(storage, catalog, registry, version)
    except ValueError as e:
        result.extra.setdefault("train_errors", []).append(str(e))
        return
    forced = promote_first and not result.extra.get("evaluations")
    if forced:
        await registry.promote(version, evaluation.as_dict())
    promoted = forced or await promote_if_better(registry, evaluation)
    threshold = (await registry.meta(version)).get("send_threshold")
    result.extra.setdefault("evaluations", []).append(
        {
            "minute": minute,
            "promoted": promoted,
            "send_threshold": threshold,
            "forced": forced,
            # The exact value of what the estimate is of (true_gain): DR's "dr_diff" estimates it.
            "true_dr_diff": true_gain(result, evaluation, users),
            **evaluation.as_dict(),
        }
    )
    if promoted and result.promote_minute is None:
        result.promote_minute = minute
        result.evaluation = result.extra["evaluations"][-1]


async def _latency_probe(
    srv: Any,
    engine: Any,
    users: list[int],
    devices: list[list[_Device]],
    n: int,
    latencies: list[float],
) -> dict[str, float]:
    """Decision latency while a device uploads 500-event batches as fast as it can.

    The device is another process (as devices are): building its batches in this one would
    put a client's CPU on the server's event loop and charge it to the decisions.
    """
    dev = devices[0][0]
    ctx = multiprocessing.get_context("spawn")
    stop, ready = ctx.Event(), ctx.Event()
    uploaded, last_seq = ctx.Value("q", 0), ctx.Value("q", dev.seq)
    load = ctx.Process(
        target=_upload_until,
        args=(srv.address, dev.metadata, srv.app.clock.now_us(), stop, ready, uploaded, last_seq),
        daemon=True,
    )
    load.start()
    try:
        if not await asyncio.to_thread(ready.wait, LOAD_START_TIMEOUT_S):
            raise RuntimeError("the load process uploaded nothing")
        lat = []
        before, t0 = uploaded.value, time.perf_counter()
        for k in range(n):
            d = await engine.decide(users[k % len(users)], srv.app.clock.now_us(), "probe")
            lat.append(d.latency_s)
            latencies.append(d.latency_s)
            await asyncio.sleep(0)
        elapsed = time.perf_counter() - t0
        during = uploaded.value - before
        if not load.is_alive():  # the figures would be of a server without load
            raise RuntimeError(f"the load process ended during the probe (exit {load.exitcode})")
    finally:
        stop.set()
        await asyncio.to_thread(load.join, LOAD_START_TIMEOUT_S)
        if load.is_alive():
            load.kill()
    dev.seq = last_seq.value
    arr = np.array(lat) * 1000
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "ingest_events_per_s": during / max(elapsed, 1e-9),
    }


def _upload_until(
    address: str,
    metadata: tuple[tuple[str, str], ...],
    now_us: int,
    stop: Any,
    ready: Any,
    uploaded: Any,
    last_seq: Any,
) -> None:
    """The load process: 500-event batches over its own channel until `stop` (or LOAD_MAX_S);
    metadata: the device's call metadata (`_Device.metadata`)."""

    async def upload() -> None:
        seq = int(last_seq.value)
        deadline = time.monotonic() + LOAD_MAX_S
        async with grpc.aio.insecure_channel(address) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            while not stop.is_set() and time.monotonic() < deadline:
                evs = []
                for _ in range(500):
                    seq += 1
                    evs.append(events_pb2.Event(event_id=str(uuid.uuid4()), seq=seq, device_time=timestamp(now_us - 60 * US_PER_MIN),
                               heart_rate=events_pb2.HeartRate(sensor_id="strap", bpm=70)))  # fmt: skip
                batch = ingest_pb2.EventBatch(batch_id=seq, sent_time=timestamp(now_us), events=evs)
                await stub.UploadBatch(ingest_pb2.UploadBatchRequest(batch=batch), metadata=metadata, timeout=30)  # fmt: skip
                last_seq.value = seq
                uploaded.value += len(evs)
                ready.set()

    asyncio.run(upload())


def run_arm_blocking(name: str, workdir: str, kwargs: dict[str, Any]) -> ArmResult:
    """run_arm in its own event loop (for a worker process); logging below WARNING is off."""
    import logging

    logging.disable(logging.WARNING)
    return asyncio.run(run_arm(name, workdir=Path(workdir), **kwargs))

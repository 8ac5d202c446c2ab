"""Context features, kept up to date incrementally from committed events, per user.

Nothing here rescans history: each committed batch updates small per-user state (per-minute
step counts for the last few hours, the last activity of each device, heart-rate and HRV
averages) and a decision reads a snapshot in O(window). Only users who granted
personalization are tracked; a withdrawal drops their state.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pulsesync.hrv import rmssd_ms
from pulsesync.server.bus import (
    ROW_BODY,
    ROW_T_US,
    CommittedBatch,
    CommittedEvent,
    CommittedRow,
    rows_of_kinds,
)
from pulsesync.server.nudges.batch_summary import BatchSummary, summarize
from pulsesync.server.timeline.steps import minute_span, step_minute
from pulsesync.timeutil import US_PER_MIN
from pulsesync.v1 import common_pb2, events_pb2

# Three hours of per-minute steps: the longest window a feature reads (120 min) plus slack
# for late, out-of-order uploads.
STEP_HISTORY_MIN: Final = 180
# Below this many steps in a minute the person counts as sedentary (walking is ~100/min).
SEDENTARY_STEPS_PER_MIN: Final = 20
# Sedentary stretches are capped: a night without data is not "sitting for 10 hours".
MAX_SEDENTARY_MIN: Final = 240
# EWMA weights over 5-minute samples: the baseline's time constant is 100 samples (~8 hours
# of wear), "now" is the last few samples.
BASELINE_ALPHA: Final = 0.01
RECENT_ALPHA: Final = 0.3
# ...which is why heart rate is sampled, not folded event by event: a strap notifies about once
# a second, and at that rate the baseline would span under two minutes. One reading per user
# per 5 minutes feeds the averages; the others are skipped before their body is even parsed.
HR_SAMPLE_US: Final = 5 * US_PER_MIN
# Past-response estimates are shrunk towards zero with this many pseudo-observations.
SHRINK_N: Final = 5.0
# The acted share of a nudge type counts this many pseudo-nudges not acted on.
RESPONSE_PRIOR_NUDGES: Final = 5.0
HOUR_BUCKETS: Final = 4  # night/morning, midday, afternoon, evening

_HEART_RATE: Final = events_pb2.EVENT_KIND_HEART_RATE
_FEATURE_USE: Final = events_pb2.EVENT_KIND_FEATURE_USE
_HEART_ONLY: Final = frozenset({_HEART_RATE})

_KIND_CODE: Final = {
    common_pb2.DEVICE_KIND_PHONE: 1,
    common_pb2.DEVICE_KIND_DESKTOP: 2,
    common_pb2.DEVICE_KIND_WEARABLE_BRIDGE: 3,
}

# The model's inputs, in order (action-specific columns are appended by the model).
FEATURE_NAMES: Final = (
    "local_minute",
    "weekday",
    "steps_30",
    "steps_60",
    "steps_120",
    "sedentary_min",
    "hr_rel",
    "rmssd_rel",
    "active_kind",
    "active_app",
    "min_since_last_nudge",
    "nudges_today",
    "days_since_first_nudge",
    "hour_past_gain",
)


@lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    """The ZoneInfo for an IANA name, UTC when unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def local_time(t_us: int, tz: str) -> datetime:
    """t_us as an aware local datetime in tz."""
    return datetime.fromtimestamp(t_us / 1e6, UTC).astimezone(zone(tz))


def local_day(t_us: int, tz: str) -> int:
    """The local calendar day (proleptic ordinal) of t_us in tz."""
    return local_time(t_us, tz).date().toordinal()


def app_code(app: str) -> int:
    """A stable small code for an app name (0 = none)."""
    return 0 if not app else 1 + zlib.crc32(app.encode()) % 997


@dataclass(slots=True)
class _Ewma:
    baseline: float | None = None
    recent: float | None = None

    def add(self, x: float) -> None:
        self.baseline = (
            x if self.baseline is None else self.baseline + BASELINE_ALPHA * (x - self.baseline)
        )
        self.recent = x if self.recent is None else self.recent + RECENT_ALPHA * (x - self.recent)

    def rel(self) -> float:
        if not self.baseline or self.recent is None:
            return 0.0
        return self.recent / self.baseline - 1.0


@dataclass(slots=True)
class _Mean:
    n: float = 0.0
    total: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        self.total += x

    def shrunk(self, prior: float) -> float:
        return (self.total + SHRINK_N * prior) / (self.n + SHRINK_N)


@dataclass(slots=True)
class UserState:
    """What the features need about one user, updated event by event."""

    steps_by_min: dict[int, int] = field(default_factory=dict)
    device_steps: dict[int, dict[int, int]] = field(default_factory=dict)  # minute -> device -> n
    last_moving_min: int | None = None
    first_seen_min: int | None = None
    device_last_us: dict[int, int] = field(default_factory=dict)
    device_kind: dict[int, int] = field(default_factory=dict)
    device_app: dict[int, str] = field(default_factory=dict)
    hr: _Ewma = field(default_factory=_Ewma)
    hrv: _Ewma = field(default_factory=_Ewma)
    hr_sampled_us: int | None = None  # the time of the last heart rate reading folded in
    # feature name -> UTC minute-of-day counts in 30-minute bins, for habitual times.
    feature_bins: dict[str, list[int]] = field(default_factory=dict)
    # Nudge history (fed by the engine, not by events).
    last_nudge_us: int | None = None
    last_by_type: dict[str, int] = field(default_factory=dict)
    sent_us: list[int] = field(default_factory=list)
    first_nudge_us: int | None = None
    outcome_by_action: dict[str, _Mean] = field(default_factory=dict)
    outcome_by_hour: dict[tuple[bool, int], _Mean] = field(default_factory=dict)
    acted_by_type: dict[str, _Mean] = field(default_factory=dict)  # 1 acted, 0 not, per nudge

    def add_steps(self, t_us: int, count: int, device_pk: int = 0) -> None:
        """Count steps ending at t_us; a minute keeps its largest device total (no double count)."""
        self.add_minute_steps(step_minute(t_us), count, device_pk)

    def add_minute_steps(self, minute: int, count: int, device_pk: int = 0) -> None:
        """Count steps a device took in a minute (see add_steps)."""
        devices = self.device_steps.setdefault(minute, {})
        devices[device_pk] = devices.get(device_pk, 0) + count
        self.steps_by_min[minute] = max(devices.values())
        if self.steps_by_min[minute] >= SEDENTARY_STEPS_PER_MIN and (
            self.last_moving_min is None or minute > self.last_moving_min
        ):
            self.last_moving_min = minute
        if len(self.steps_by_min) > 2 * STEP_HISTORY_MIN:
            newest = max(self.steps_by_min)
            for m in [m for m in self.steps_by_min if m < newest - STEP_HISTORY_MIN]:
                del self.steps_by_min[m]
                self.device_steps.pop(m, None)

    def steps_since(self, now_us: int, minutes: int) -> int:
        """Steps in the last `minutes` minutes before now_us (the rule of timeline/steps.py)."""
        first, end = minute_span(now_us - minutes * US_PER_MIN, now_us)
        return sum(c for m, c in self.steps_by_min.items() if first <= m < end)

    def sedentary_since(self) -> int | None:
        """The minute the current sedentary stretch began after (its identity), if any data."""
        return self.last_moving_min if self.last_moving_min is not None else self.first_seen_min

    def sedentary_min(self, now_us: int) -> float:
        since = self.sedentary_since()
        if since is None:
            return 0.0
        return float(min(MAX_SEDENTARY_MIN, max(0, now_us // US_PER_MIN - since - 1)))

    def active_device(self, now_us: int, window_us: int) -> int | None:
        """The device with the most recent event within window_us, if any."""
        best: tuple[int, int] | None = None
        for pk, t in self.device_last_us.items():
            if now_us - t <= window_us and (best is None or t > best[0]):
                best = (t, pk)
        return best[1] if best else None

    def habitual_near(self, feature: str, now_us: int, min_uses: int = 3) -> bool:
        """Whether the person usually uses feature within 30 minutes of this time of day."""
        bins = self.feature_bins.get(feature)
        if not bins:
            return False
        b = (now_us // US_PER_MIN) % 1440 // 30
        return bins[b] + bins[(b + 1) % 48] + bins[(b - 1) % 48] >= min_uses

    def record_nudge(self, nudge_type: str, t_us: int) -> None:
        self.last_nudge_us = t_us
        self.last_by_type[nudge_type] = t_us
        self.sent_us.append(t_us)
        del self.sent_us[: max(0, len(self.sent_us) - 64)]
        if self.first_nudge_us is None:
            self.first_nudge_us = t_us

    def record_outcome(self, action: str, local_hour_bucket: int, steps: float) -> None:
        self.outcome_by_action.setdefault(action, _Mean()).add(steps)
        key = (action != "none", local_hour_bucket)
        self.outcome_by_hour.setdefault(key, _Mean()).add(steps)

    def record_response(self, nudge_type: str, acted: bool) -> None:
        """Whether the person acted on a nudge of this type (from device feedback)."""
        self.acted_by_type.setdefault(nudge_type, _Mean()).add(1.0 if acted else 0.0)

    def past_response(self, nudge_type: str) -> float:
        """The share of this type's nudges the person acted on, shrunk towards none.

        Shrunk towards 0 by RESPONSE_PRIOR_NUDGES pseudo-nudges: acting once on the first
        nudge is weak evidence, acting on a few of thirty is not.
        """
        rate = self.acted_by_type.get(nudge_type)
        if rate is None:
            return 0.0
        return rate.total / (rate.n + RESPONSE_PRIOR_NUDGES)

    def past_gain(self, action: str) -> float:
        """The user's mean steps after this action minus after sending nothing (shrunk)."""
        none = self.outcome_by_action.get("none")
        mine = self.outcome_by_action.get(action)
        if none is None or mine is None or none.n == 0:
            return 0.0
        base = none.total / none.n
        return mine.shrunk(base) - base

    def hour_gain(self, bucket: int) -> float:
        sent = self.outcome_by_hour.get((True, bucket))
        none = self.outcome_by_hour.get((False, bucket))
        if sent is None or none is None or none.n == 0:
            return 0.0
        base = none.total / none.n
        return sent.shrunk(base) - base


def hour_bucket(local_minute: int) -> int:
    """Which quarter of the waking day: <11:00, <14:00, <17:00, later."""
    if local_minute < 660:
        return 0
    if local_minute < 840:
        return 1
    if local_minute < 1020:
        return 2
    return 3


@dataclass(frozen=True, slots=True)
class Context:
    """A snapshot of one user's features at a decision point."""

    values: dict[str, float]
    past_gain: dict[str, float]
    active_device_pk: int | None
    sedentary_min: float
    steps_per_min_recent: float
    stress: float
    past_response: dict[str, float] = field(default_factory=dict)  # nudge type -> acted share


class FeatureStore:
    """Per-user feature state for consenting users, fed by the committed-events bus."""

    def __init__(self, active_window_us: int) -> None:
        self._users: dict[int, UserState] = {}
        self._active_window_us = active_window_us

    def user(self, user_id: int) -> UserState:
        """The user's state (created empty on first use)."""
        state = self._users.get(user_id)
        if state is None:
            state = self._users[user_id] = UserState()
        return state

    def known_users(self) -> list[int]:
        return list(self._users)

    def forget(self, user_id: int) -> None:
        """Drop everything held about the user (consent withdrawn or erased)."""
        self._users.pop(user_id, None)

    def note_device(self, user_id: int, device_pk: int, kind: int) -> None:
        self.user(user_id).device_kind[device_pk] = kind

    def apply(self, user_id: int, events: Iterable[CommittedEvent]) -> None:
        """Fold committed events into the user's state.

        A batch is folded from its summary (nudges/batch_summary.py): its time range, the latest
        time of each device, the kinds present, the steps per device and minute, and where
        its app events are. The ingest writer process summarizes each batch as it commits
        it; a batch that arrives without one is summarized here. Rows are read only for the
        app events and, when a new 5-minute sample is due, heart rate.
        """
        # A committed batch's plain rows unpack like CommittedEvents, without building them.
        batch = events if isinstance(events, CommittedBatch) else CommittedBatch(list(events))
        rows = batch.rows
        plain = batch.derived if batch.derived is not None else summarize(rows)
        if plain is None:
            return
        s = BatchSummary.read(plain)
        state = self.user(user_id)
        minute = s.earliest_us // US_PER_MIN
        if state.first_seen_min is None or minute < state.first_seen_min:
            state.first_seen_min = minute
        last_seen = state.device_last_us
        for device_pk, t_us in s.device_latest:
            if t_us > last_seen.get(device_pk, 0):
                last_seen[device_pk] = t_us
        for device_pk, minute, count in s.steps:
            state.add_minute_steps(minute, count, device_pk)
        sampled = state.hr_sampled_us
        if _HEART_RATE in s.kinds and not (
            # every reading is within HR_SAMPLE_US of the last sample: none is due
            sampled is not None
            and s.latest_us - sampled < HR_SAMPLE_US
            and sampled - s.earliest_us < HR_SAMPLE_US
        ):
            self._sample_heart_rate(state, rows)
        if s.app_rows:
            self._fold_app_events(state, [rows[i] for i in s.app_rows])

    @staticmethod
    def _sample_heart_rate(state: UserState, rows: Sequence[CommittedRow]) -> None:
        """One heart-rate reading per HR_SAMPLE_US into the averages, in row order."""
        for row in rows_of_kinds(rows, _HEART_ONLY):
            t_us = row[ROW_T_US]
            last = state.hr_sampled_us
            if last is not None and abs(t_us - last) < HR_SAMPLE_US:
                continue
            state.hr_sampled_us = t_us
            hr = events_pb2.Event.FromString(row[ROW_BODY]).heart_rate
            if hr.HasField("bpm"):  # absent: not measured
                state.hr.add(float(hr.bpm))
            r = (
                hr.rmssd_ms
                if hr.HasField("rmssd_ms")
                else rmssd_ms(hr.rr_intervals_ms, min_intervals=3)
            )
            if r is not None and r > 0:
                state.hrv.add(r)

    @staticmethod
    def _fold_app_events(state: UserState, rows: list[CommittedRow]) -> None:
        """Feature use by half hour of the day, and the app last named on each device."""
        app_event: dict[int, bytes] = {}  # device -> the body of its last app event
        for _, device_pk, _, t_us, kind, body, _ in rows:
            app_event[device_pk] = body
            if kind == _FEATURE_USE:
                feature = events_pb2.Event.FromString(body).feature_use.feature
                bins = state.feature_bins.setdefault(feature, [0] * 48)
                bins[t_us // US_PER_MIN % 1440 // 30] += 1
        for device_pk, body in app_event.items():  # the app in use is the last one named
            msg = events_pb2.Event.FromString(body)
            which = msg.WhichOneof("payload")
            if which == "feature_use":
                state.device_app[device_pk] = msg.feature_use.app
            elif which == "screen_view":
                state.device_app[device_pk] = msg.screen_view.app
            else:
                state.device_app[device_pk] = msg.session_start.app

    def context(
        self, user_id: int, now_us: int, tz: str, nudges_today: int, habitual: Iterable[str] = ()
    ) -> Context:
        """The user's features at now_us, local time in tz (plus habitual_<feature> flags)."""
        s = self.user(user_id)
        lt = local_time(now_us, tz)
        local_minute = lt.hour * 60 + lt.minute
        active = s.active_device(now_us, self._active_window_us)
        steps_30 = s.steps_since(now_us, 30)
        recent_10 = s.steps_since(now_us, 10) / 10.0
        stress = max(0.0, -s.hrv.rel())
        values = {
            "local_minute": float(local_minute),
            "weekday": float(lt.weekday()),
            "steps_30": float(steps_30),
            "steps_60": float(s.steps_since(now_us, 60)),
            "steps_120": float(s.steps_since(now_us, 120)),
            "sedentary_min": s.sedentary_min(now_us),
            "hr_rel": s.hr.rel(),
            "rmssd_rel": s.hrv.rel(),
            "active_kind": float(_KIND_CODE.get(s.device_kind.get(active, 0), 0))  # type: ignore[call-overload]
            if active
            else 0.0,
            "active_app": float(app_code(s.device_app.get(active, ""))) if active else 0.0,
            "min_since_last_nudge": (
                min(1440.0, (now_us - s.last_nudge_us) / US_PER_MIN) if s.last_nudge_us else 1440.0
            ),
            "nudges_today": float(nudges_today),
            "days_since_first_nudge": (
                (now_us - s.first_nudge_us) / (1440 * US_PER_MIN) if s.first_nudge_us else 0.0
            ),
            "hour_past_gain": s.hour_gain(hour_bucket(local_minute)),
        }
        for feature in habitual:
            values[f"habitual_{feature}"] = float(s.habitual_near(feature, now_us))
        past = {a: s.past_gain(a) for a in s.outcome_by_action}
        response = {t: s.past_response(t) for t in s.acted_by_type}
        return Context(values, past, active, values["sedentary_min"], recent_10, stress, response)

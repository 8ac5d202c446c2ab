"""Which nudge types may be sent now, and to which device: rules first, learning after.

Pure functions of the user's consents, profile, nudge history, context and reachable devices:
the property tests drive them over random timelines. Sending nothing is always eligible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pulsesync.server.nudges.catalog import NONE_ACTION, Catalog, NudgeType
from pulsesync.server.nudges.features import Context, local_day, local_time
from pulsesync.v1 import common_pb2


@dataclass(frozen=True, slots=True)
class ContinuityRef:
    """The continuity item a resume nudge points at: what the app needs to open it."""

    app: str
    item_id: str
    title: str
    position: str = ""
    progress: float = 0.0
    device_id: str = ""  # the device the person left it on

    def data(self) -> dict[str, str]:
        """The nudge's `data` entries (documented on pulsesync.v1.Nudge.data)."""
        return {
            "app": self.app,
            "item_id": self.item_id,
            "title": self.title,
            "position": self.position,
            "progress": f"{self.progress:.2f}",
            "device_id": self.device_id,
        }


@dataclass(frozen=True, slots=True)
class NudgeProfile:
    """What eligibility needs from the person's profile."""

    time_zone: str
    quiet_start_min: int
    quiet_end_min: int
    muted: frozenset[str] = frozenset()
    continuity_title: str | None = None
    daily_study_minutes: int = 0
    continuity: ContinuityRef | None = None  # the item continuity_title names


@dataclass(frozen=True, slots=True)
class Reachable:
    """A device with an open nudge stream: its kind and its last activity (0 if none)."""

    device_pk: int
    kind: int
    last_active_us: int


@dataclass(frozen=True, slots=True)
class Eligibility:
    """The options open now (send-nothing first), why the others are not, and routing."""

    options: tuple[str, ...]
    ineligible: dict[str, str]
    device_for: dict[str, int]


def in_quiet_hours(local_minute: int, start: int, end: int) -> bool:
    """Whether local_minute falls in [start, end); end < start spans midnight; start == end is none."""
    if start == end:
        return False
    if start < end:
        return start <= local_minute < end
    return local_minute >= start or local_minute < end


def route(nudge_type: NudgeType, devices: Sequence[Reachable]) -> int | None:
    """The device to show the nudge on: the one in use now, else the most recently used
    reachable device of an allowed kind, else one by the type's kind preference."""
    allowed = [d for d in devices if d.kind in nudge_type.device_kinds]
    if not allowed:
        return None
    recent = [d for d in allowed if d.last_active_us > 0]
    if recent:
        return max(recent, key=lambda d: (d.last_active_us, -d.device_pk)).device_pk
    order = {k: i for i, k in enumerate(nudge_type.device_kinds)}
    return min(allowed, key=lambda d: (order[d.kind], d.device_pk)).device_pk


def eligible(
    catalog: Catalog,
    *,
    now_us: int,
    granted: frozenset[int],
    profile: NudgeProfile,
    history: Sequence[tuple[str, int]],
    context: Context,
    devices: Sequence[Reachable],
) -> Eligibility:
    """The eligible options now; history is (type, sent time) of earlier nudges."""
    p = catalog.policy
    everything: dict[str, str] = {}

    def none_but(reason: str) -> Eligibility:
        return Eligibility((NONE_ACTION,), {t.name: reason for t in catalog.types}, {})

    if common_pb2.CONSENT_CATEGORY_PERSONALIZATION not in granted:
        return none_but("no personalization consent")
    lt = local_time(now_us, profile.time_zone)
    minute = lt.hour * 60 + lt.minute
    if in_quiet_hours(minute, profile.quiet_start_min, profile.quiet_end_min):
        return none_but("quiet hours")
    today = local_day(now_us, profile.time_zone)
    sent_today = [
        (t, at) for t, at in history if at <= now_us and local_day(at, profile.time_zone) == today
    ]
    if len(sent_today) >= p.daily_cap:
        return none_but("daily cap reached")
    last_any = max((at for _, at in history if at <= now_us), default=None)
    if last_any is not None and now_us - last_any < p.global_cooldown_us:
        return none_but("cooling down after the last nudge")

    options = [NONE_ACTION]
    device_for: dict[str, int] = {}
    for t in catalog.types:
        why = _type_blocked(t, now_us, minute, granted, profile, history, sent_today, context)
        if why is None:
            pk = route(t, devices)
            if pk is None:
                why = "no reachable device of an allowed kind"
            else:
                device_for[t.name] = pk
        if why is None:
            options.append(t.name)
        else:
            everything[t.name] = why
    return Eligibility(tuple(options), everything, device_for)


def _type_blocked(
    t: NudgeType,
    now_us: int,
    local_minute: int,
    granted: frozenset[int],
    profile: NudgeProfile,
    history: Sequence[tuple[str, int]],
    sent_today: Sequence[tuple[str, int]],
    context: Context,
) -> str | None:
    if t.consent not in granted:
        return "consent for this type not granted"
    if t.name in profile.muted:
        return "muted by the person"
    if sum(1 for name, _ in sent_today if name == t.name) >= t.daily_cap:
        return "daily cap for this type reached"
    last = max((at for name, at in history if name == t.name and at <= now_us), default=None)
    if last is not None and now_us - last < t.cooldown_us:
        return "cooling down"
    if (
        t.max_recent_steps_per_min is not None
        and context.steps_per_min_recent > t.max_recent_steps_per_min
    ):
        return "already active"
    if t.min_sedentary_min is not None and context.sedentary_min < t.min_sedentary_min:
        return "not sedentary long enough"
    if t.needs_continuity_item and not profile.continuity_title:
        return "nothing to resume"
    if t.near_habitual_feature is not None and not context.values.get(
        f"habitual_{t.near_habitual_feature}", 0.0
    ):
        return "not the habitual time"
    if t.min_stress is not None and context.stress < t.min_stress:
        return "stress not elevated"
    if t.after_local_min is not None and local_minute < t.after_local_min:
        return "too early in the day"
    return None


def template_values(context: Context, profile: NudgeProfile) -> Mapping[str, str]:
    """Values for the catalog's message templates."""
    return {
        "walk_steps": "1000",
        "sedentary_min": str(int(context.sedentary_min)),
        "item_title": profile.continuity_title or "",
        "study_minutes_left": str(profile.daily_study_minutes),
    }

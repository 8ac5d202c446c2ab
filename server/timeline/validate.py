"""Per-event validation of uploaded events: what is stored, what is quarantined and why.

Runs on the ingest hot path, once per event, so each check is a handful of attribute reads.
A failed check yields a `Problem` (a stable code for metrics and the quarantine table, and a
sentence for the person reading the ack); the event is then quarantined, never silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from google.protobuf import duration_pb2

from pulsesync.limits import MAX_BPM, MAX_CADENCE_PER_MIN, MAX_RR_MS, MAX_SPEED_M_PER_S
from pulsesync.timeutil import US_PER_DAY, US_PER_MIN, US_PER_MS, US_PER_S
from pulsesync.v1 import events_pb2

# event_id is a UUID (36 characters); 64 leaves room for other id schemes without letting a
# client stuff a payload into the key.
MAX_EVENT_ID_LENGTH: Final = 64
# App, screen, feature and sensor names are identifiers; a search query is free text.
MAX_NAME_LENGTH: Final = 256
MAX_QUERY_LENGTH: Final = 1024
# A Heart Rate Measurement notification holds at most ~9 RR values; a batch of them from a
# bridge that buffered is still far below this.
MAX_RR_PER_EVENT: Final = 256
# Steps and app durations are per event (an interval); a day is already implausible.
MAX_STEPS_PER_EVENT: Final = 100_000
MAX_DURATION_US: Final = US_PER_DAY
# Corrected event times may run slightly ahead of the server (skew estimates are not exact)
# but not by more than this.
MAX_FUTURE_US: Final = 5 * US_PER_MIN
# Older than this is not "late", it is a replayed archive or a clock reset to an old date: it
# would fall outside every retention window and every summary anyone asks for.
MAX_AGE_US: Final = 400 * US_PER_DAY
_NANOS: Final = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Problem:
    """Why an event was not accepted: a stable code and a sentence for people."""

    code: str
    detail: str


def _enum_values(enum: object) -> frozenset[int]:
    return frozenset(enum.values())  # type: ignore[attr-defined]


_CONTACT: Final = _enum_values(events_pb2.SensorContact)
_LOCATION: Final = _enum_values(events_pb2.BodyLocation)
_STEPS_SOURCE: Final = _enum_values(events_pb2.StepsSource)
_MOTION: Final = _enum_values(events_pb2.MotionKind)
_NUDGE_ACTION: Final = _enum_values(events_pb2.NudgeAction) - {events_pb2.NUDGE_ACTION_UNSPECIFIED}

# Payload field name -> EventKind value (they are equal to the field numbers by design).
KIND_OF_PAYLOAD: Final[dict[str, int]] = {
    f.name: f.number for f in events_pb2.Event.DESCRIPTOR.oneofs_by_name["payload"].fields
}


def _long(what: str, value: str, limit: int = MAX_NAME_LENGTH) -> Problem | None:
    if len(value) > limit:
        return Problem("FIELD_TOO_LONG", f"{what} is {len(value)} characters; at most {limit}")
    return None


def _bad_duration(what: str, d: duration_pb2.Duration) -> Problem | None:
    s, n = d.seconds, d.nanos
    if s < 0 or n < 0:
        return Problem("NEGATIVE_DURATION", f"{what} is negative")
    if n >= _NANOS or s * US_PER_S + n // US_PER_MS > MAX_DURATION_US:
        return Problem("VALUE_OUT_OF_RANGE", f"{what} is longer than 24 hours")
    return None


def _unknown_enum(what: str, value: int) -> Problem:
    return Problem(
        "UNKNOWN_ENUM_VALUE",
        f"{what} has the unknown value {value} (newer client? upgrade the server)",
    )


def _check_screen_view(e: events_pb2.Event) -> Problem | None:
    p = e.screen_view
    return (
        _long("screen_view.app", p.app)
        or _long("screen_view.screen", p.screen)
        or _bad_duration("screen_view.dwell", p.dwell)
    )


def _check_tap(e: events_pb2.Event) -> Problem | None:
    p = e.tap
    return _long("tap.app", p.app) or _long("tap.screen", p.screen) or _long("tap.target", p.target)


def _check_feature_use(e: events_pb2.Event) -> Problem | None:
    p = e.feature_use
    return (
        _long("feature_use.app", p.app)
        or _long("feature_use.feature", p.feature)
        or _bad_duration("feature_use.duration", p.duration)
    )


def _check_search(e: events_pb2.Event) -> Problem | None:
    p = e.search
    return _long("search.app", p.app) or _long("search.query", p.query, MAX_QUERY_LENGTH)


def _check_session_start(e: events_pb2.Event) -> Problem | None:
    p = e.session_start
    return _long("session_start.app", p.app) or _long("session_start.session_id", p.session_id)


def _check_session_end(e: events_pb2.Event) -> Problem | None:
    p = e.session_end
    return (
        _long("session_end.app", p.app)
        or _long("session_end.session_id", p.session_id)
        or _bad_duration("session_end.duration", p.duration)
    )


def _check_heart_rate(e: events_pb2.Event) -> Problem | None:
    return _heart_rate_values(e) or _long("heart_rate.sensor_id", e.heart_rate.sensor_id)


def _heart_rate_values(e: events_pb2.Event) -> Problem | None:
    p = e.heart_rate
    rr = p.rr_intervals_ms[:]  # a list: iterating it is several times cheaper than the field
    # bpm is optional: absent means the sensor did not measure it (an event may carry only RR
    # intervals), but an event that measured nothing at all carries no reading.
    bpm = p.bpm  # 0 when absent: HasField only tells an explicit 0 from none (it costs a call)
    if bpm or p.HasField("bpm"):
        if not 0 < bpm <= MAX_BPM:
            return Problem("VALUE_OUT_OF_RANGE", f"heart_rate.bpm is {bpm}; expected 1..{MAX_BPM}")
    elif not rr:
        return Problem("MISSING_FIELD", "heart_rate has neither bpm nor RR intervals")
    if rr:
        if len(rr) > MAX_RR_PER_EVENT:
            return Problem(
                "VALUE_OUT_OF_RANGE",
                f"heart_rate has {len(rr)} RR intervals; at most {MAX_RR_PER_EVENT}",
            )
        for r in rr:
            if not 0.0 < r <= MAX_RR_MS:  # also false for NaN
                return Problem(
                    "VALUE_OUT_OF_RANGE",
                    f"heart_rate RR interval {r} ms; expected more than 0 and at most {MAX_RR_MS:g}",
                )
    if p.HasField("rmssd_ms"):
        problem = _finite_in("heart_rate.rmssd_ms", p.rmssd_ms, MAX_RR_MS) or _bad_duration(
            "heart_rate.rmssd_window", p.rmssd_window
        )
        if problem is not None:
            return problem
    if p.contact not in _CONTACT:
        return _unknown_enum("heart_rate.contact", p.contact)
    if p.location not in _LOCATION:
        return _unknown_enum("heart_rate.location", p.location)
    return None


def _check_steps(e: events_pb2.Event) -> Problem | None:
    return _steps_values(e) or _long("steps.sensor_id", e.steps.sensor_id)


def _steps_values(e: events_pb2.Event) -> Problem | None:
    p = e.steps
    if p.count > MAX_STEPS_PER_EVENT:
        return Problem(
            "VALUE_OUT_OF_RANGE", f"steps.count is {p.count}; at most {MAX_STEPS_PER_EVENT}"
        )
    if p.source not in _STEPS_SOURCE:
        return _unknown_enum("steps.source", p.source)
    return _bad_duration("steps.interval", p.interval)


def _finite_in(what: str, value: float, high: float) -> Problem | None:
    if not 0.0 <= value <= high:  # also false for NaN
        return Problem("VALUE_OUT_OF_RANGE", f"{what} is {value}; expected 0..{high:g}")
    return None


def _check_cadence(e: events_pb2.Event) -> Problem | None:
    p = e.cadence
    if p.motion not in _MOTION:
        return _unknown_enum("cadence.motion", p.motion)
    # Both are optional (absent: not measured); a value that is present must be plausible.
    problem = None
    if p.HasField("cadence_per_min"):
        problem = _finite_in("cadence.cadence_per_min", p.cadence_per_min, MAX_CADENCE_PER_MIN)
    if problem is None and p.HasField("speed_m_per_s"):
        problem = _finite_in("cadence.speed_m_per_s", p.speed_m_per_s, MAX_SPEED_M_PER_S)
    if problem is None and p.HasField("stride_length_m"):
        problem = _finite_in("cadence.stride_length_m", p.stride_length_m, 10.0)
    if problem is None and p.HasField("total_distance_m") and not math.isfinite(p.total_distance_m):
        problem = Problem("VALUE_OUT_OF_RANGE", "cadence.total_distance_m is not a number")
    return problem or _long("cadence.sensor_id", p.sensor_id)


def _check_battery(e: events_pb2.Event) -> Problem | None:
    p = e.battery
    if p.level_percent > 100:
        return Problem(
            "VALUE_OUT_OF_RANGE", f"battery.level_percent is {p.level_percent}; at most 100"
        )
    return _long("battery.sensor_id", p.sensor_id)


def _check_oxygen(e: events_pb2.Event) -> Problem | None:
    p = e.oxygen_saturation
    if not 0.0 < p.spo2_percent <= 100.0:
        return Problem(
            "VALUE_OUT_OF_RANGE",
            f"oxygen_saturation.spo2_percent is {p.spo2_percent}; expected more than 0 and at most 100",
        )
    if p.HasField("pulse_rate_bpm"):  # absent: the oximeter did not report one
        problem = _finite_in("oxygen_saturation.pulse_rate_bpm", p.pulse_rate_bpm, float(MAX_BPM))
        if problem is not None:
            return problem
    return _long("oxygen_saturation.sensor_id", p.sensor_id)


def _check_nudge(e: events_pb2.Event) -> Problem | None:
    p = e.nudge_interaction
    if not p.nudge_id:
        return Problem("MISSING_FIELD", "nudge_interaction.nudge_id is empty")
    if p.action not in _NUDGE_ACTION:
        return _unknown_enum("nudge_interaction.action", p.action)
    return _long("nudge_interaction.nudge_id", p.nudge_id)


PAYLOAD_CHECKS: Final[dict[str, Callable[[events_pb2.Event], Problem | None]]] = {
    "screen_view": _check_screen_view,
    "tap": _check_tap,
    "feature_use": _check_feature_use,
    "search": _check_search,
    "session_start": _check_session_start,
    "session_end": _check_session_end,
    "heart_rate": _check_heart_rate,
    "steps": _check_steps,
    "cadence": _check_cadence,
    "battery": _check_battery,
    "oxygen_saturation": _check_oxygen,
    "nudge_interaction": _check_nudge,
}
assert set(PAYLOAD_CHECKS) == set(KIND_OF_PAYLOAD), "every payload kind needs a check"

# The same checks for an event whose serialized size is at most MAX_NAME_LENGTH bytes: none of
# its strings can then be longer than any length limit (a character takes at least one byte of
# UTF-8 and every limit is at least MAX_NAME_LENGTH), so the length checks are skipped. Most
# sensor and app events are well under 256 bytes; this saves a few field reads per event.
SHORT_EVENT_CHECKS: Final[dict[str, Callable[[events_pb2.Event], Problem | None]]] = {
    **PAYLOAD_CHECKS,
    "screen_view": lambda e: _bad_duration("screen_view.dwell", e.screen_view.dwell),
    "tap": lambda e: None,
    "feature_use": lambda e: _bad_duration("feature_use.duration", e.feature_use.duration),
    "search": lambda e: None,
    "session_start": lambda e: None,
    "session_end": lambda e: _bad_duration("session_end.duration", e.session_end.duration),
    "heart_rate": _heart_rate_values,
    "steps": _steps_values,
}
assert MAX_NAME_LENGTH <= MAX_QUERY_LENGTH, "short events skip every length check"


# Sequence numbers are stored in SQLite INTEGER columns (signed 64-bit); a device counting from 1
# never gets near this, so a larger one is a bug or a hostile client, never data.
MAX_SEQ: Final = 2**63 - 1


def check_envelope(e: events_pb2.Event) -> Problem | None:
    """Problems with the fields every event carries (id, seq, time), or None."""
    event_id = e.event_id
    if not event_id:
        return Problem("MISSING_EVENT_ID", "event_id is empty; set a UUID")
    if len(event_id) > MAX_EVENT_ID_LENGTH:
        return Problem(
            "FIELD_TOO_LONG",
            f"event_id is {len(event_id)} characters; at most {MAX_EVENT_ID_LENGTH}",
        )
    if e.seq == 0:
        return Problem("MISSING_SEQ", "seq is 0; sequence numbers start at 1")
    if e.seq > MAX_SEQ:
        return Problem(
            "SEQ_TOO_LARGE", f"seq is {e.seq}; sequence numbers must be at most {MAX_SEQ}"
        )
    if not e.HasField("device_time"):
        return Problem("MISSING_DEVICE_TIME", "device_time is not set")
    if not 0 <= e.device_time.nanos < _NANOS:
        return Problem("INVALID_TIME", f"device_time.nanos is {e.device_time.nanos}")
    return None


def no_payload() -> Problem:
    """The problem of an event without a known payload (unknown kinds arrive as unknown fields)."""
    return Problem(
        "UNKNOWN_KIND",
        "no known payload: an event kind this server does not know (a newer client?) "
        "or an event without a payload; upgrade the server or set a payload",
    )


def check_time(t_us: int, now_us: int) -> Problem | None:
    """Problems with a corrected event time, or None."""
    if t_us > now_us + MAX_FUTURE_US:
        ahead = t_us - now_us
        return Problem(
            "TIME_IN_FUTURE",
            f"device_time is {_human(ahead)} in the future after clock correction; "
            "check the device clock",
        )
    if t_us < now_us - MAX_AGE_US:
        return Problem(
            "TIME_TOO_OLD",
            f"device_time is {_human(now_us - t_us)} in the past; at most 400 days are accepted",
        )
    return None


def _human(us: int) -> str:
    seconds = us / US_PER_S
    if seconds >= 2 * 86_400:
        return f"{seconds / 86_400:.0f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.0f} hours"
    if seconds >= 120:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds:.0f} seconds"


def validate_event(e: events_pb2.Event, t_us: int, now_us: int) -> Problem | None:
    """The first problem of an uploaded event, or None: the definition every path must match.

    In order: the envelope (id, seq, device time), a known payload, the corrected time t_us
    against the server's now_us, then the payload's own checks. Ingest's fast path
    (timeline/ingest.py `problem_of`) skips the checks it can prove pass; a property test
    holds it equal to this.
    """
    which = e.WhichOneof("payload")
    return (
        check_envelope(e)
        or (no_payload() if which is None else None)
        or check_time(t_us, now_us)
        or PAYLOAD_CHECKS[which or ""](e)
    )

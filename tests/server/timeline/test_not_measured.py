"""Optional sensor fields: absent means "not measured"; the server stores such events, checks
only the values present, and leaves absent ones out of averages and exports."""

from __future__ import annotations

from pulsesync.server.privacy.export import encode_blob
from pulsesync.server.timeline.aggregates import summarize_events
from pulsesync.server.timeline.store import StoredEvent
from pulsesync.server.timeline.validate import PAYLOAD_CHECKS
from pulsesync.v1 import events_pb2


def _check(event: events_pb2.Event) -> str | None:
    problem = PAYLOAD_CHECKS[str(event.WhichOneof("payload"))](event)
    return None if problem is None else problem.code


def test_absent_values_are_not_measured_and_present_ones_are_still_checked() -> None:
    rr_only = events_pb2.Event(heart_rate=events_pb2.HeartRate(rr_intervals_ms=[700.0]))
    assert _check(rr_only) is None
    nothing = events_pb2.Event(heart_rate=events_pb2.HeartRate(sensor_id="s"))
    assert _check(nothing) == "MISSING_FIELD"
    assert _check(events_pb2.Event(heart_rate=events_pb2.HeartRate(bpm=0))) == (
        "VALUE_OUT_OF_RANGE"
    )
    crank_only = events_pb2.Event(cadence=events_pb2.Cadence(cadence_per_min=88.0))
    assert _check(crank_only) is None
    bad_speed = events_pb2.Event(cadence=events_pb2.Cadence(speed_m_per_s=256.0))
    assert _check(bad_speed) == "VALUE_OUT_OF_RANGE"
    no_pulse = events_pb2.Event(oxygen_saturation=events_pb2.OxygenSaturation(spo2_percent=97.0))
    assert _check(no_pulse) is None
    bad_pulse = events_pb2.Event(
        oxygen_saturation=events_pb2.OxygenSaturation(spo2_percent=97.0, pulse_rate_bpm=-1.0)
    )
    assert _check(bad_pulse) == "VALUE_OUT_OF_RANGE"


def test_a_heart_rate_without_bpm_is_left_out_of_the_mean() -> None:
    def stored(t_us: int, hr: events_pb2.HeartRate) -> StoredEvent:
        event = events_pb2.Event(heart_rate=hr)
        return StoredEvent("d", 0, t_us, t_us, events_pb2.EVENT_KIND_HEART_RATE, event)

    events = [
        stored(1, events_pb2.HeartRate(bpm=60)),
        stored(2, events_pb2.HeartRate(rr_intervals_ms=[700.0, 710.0])),
        stored(3, events_pb2.HeartRate(bpm=80)),
    ]
    [bucket] = summarize_events(events, 0, 10, 10)
    assert bucket.mean_heart_rate_bpm == 70.0
    assert bucket.event_count == 3


def test_the_export_says_not_measured_by_leaving_the_field_out() -> None:
    # standing still is a measured 0 and is exported as one
    still = events_pb2.Event(cadence=events_pb2.Cadence(cadence_per_min=88.0, speed_m_per_s=0.0))
    exported = encode_blob("events", "body", still.SerializeToString())
    assert exported["cadence"] == {"cadence_per_min": 88.0, "speed_m_per_s": 0.0}
    wheel_only = events_pb2.Event(cadence=events_pb2.Cadence(speed_m_per_s=5.0))
    exported = encode_blob("events", "body", wheel_only.SerializeToString())
    assert exported["cadence"] == {"speed_m_per_s": 5.0}

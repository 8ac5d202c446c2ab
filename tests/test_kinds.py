from __future__ import annotations

from pulsesync.kinds import CATEGORY_OF_KIND, category_of, kind_of
from pulsesync.v1 import common_pb2, events_pb2


def test_every_event_kind_has_a_consent_category() -> None:
    kinds = {v for v in events_pb2.EventKind.values() if v != events_pb2.EVENT_KIND_UNSPECIFIED}
    assert set(CATEGORY_OF_KIND) == kinds


def test_kind_values_equal_payload_field_numbers() -> None:
    payload = events_pb2.Event.DESCRIPTOR.oneofs_by_name["payload"]
    for field in payload.fields:
        assert events_pb2.EventKind.Value("EVENT_KIND_" + field.name.upper()) == field.number


def test_kind_and_category_of_an_event() -> None:
    event = events_pb2.Event(heart_rate=events_pb2.HeartRate(bpm=61))
    assert kind_of(event) == events_pb2.EVENT_KIND_HEART_RATE
    assert category_of(event) == common_pb2.CONSENT_CATEGORY_ACTIVITY
    assert kind_of(events_pb2.Event()) == events_pb2.EVENT_KIND_UNSPECIFIED

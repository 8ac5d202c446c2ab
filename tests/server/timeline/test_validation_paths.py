"""Ingest's fast validation path and the definition in validate.py are one rule.

`ingest.problem_of` skips checks it can prove pass (a sound envelope, a body too short to break
a length limit); `validate.validate_event` is the definition. For any event, however odd,
both name the same problem (code and sentence), or both accept it.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor
from hypothesis import given, settings
from hypothesis import strategies as st

from pulsesync.server.timeline.ingest import envelope_of, problem_of
from pulsesync.server.timeline.validate import (
    MAX_AGE_US,
    MAX_FUTURE_US,
    MAX_NAME_LENGTH,
    validate_event,
)
from pulsesync.v1 import events_pb2

NOW_US = 1_767_225_600_000_000
FD = descriptor.FieldDescriptor
PAYLOADS = [f.name for f in events_pb2.Event.DESCRIPTOR.oneofs_by_name["payload"].fields]

# Strings around every length limit, some multi-byte (a limit counts characters).
texts = st.one_of(
    st.text(max_size=8),
    st.integers(0, 1100).map(lambda n: "a" * n),
    st.sampled_from([MAX_NAME_LENGTH, MAX_NAME_LENGTH + 1, 1024, 1025]).map(lambda n: "é" * n),
)
uints = st.one_of(st.integers(0, 400), st.sampled_from([100_000, 100_001, 2**32 - 1]))
floats = st.one_of(st.floats(width=32), st.floats(-10, 5000, width=32))
durations = st.tuples(
    st.sampled_from([0, 1, -1, 86_400, 86_401, 10**6, -(10**6)]),
    st.sampled_from([0, 1, -1, 999_999_999, 10**9]),
)


@st.composite
def payload_values(draw: st.DrawFn, name: str) -> dict[str, Any]:
    """Values for the fields of one payload message, each drawn by its type."""
    msg = events_pb2.Event.DESCRIPTOR.fields_by_name[name].message_type
    assert msg is not None
    out: dict[str, Any] = {}
    for f in msg.fields:
        if not draw(st.booleans()):
            continue  # left unset
        if f.type == FD.TYPE_STRING:
            value: Any = draw(texts)
        elif f.type == FD.TYPE_ENUM:
            value = draw(st.integers(-2, 12))
        elif f.type in (FD.TYPE_UINT32, FD.TYPE_UINT64):
            value = draw(uints)
        elif f.type in (FD.TYPE_INT32, FD.TYPE_INT64):
            value = draw(st.integers(-(2**31), 2**31 - 1))
        elif f.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
            value = draw(floats)
        elif f.type == FD.TYPE_BOOL:
            value = draw(st.booleans())
        elif (
            f.type == FD.TYPE_MESSAGE
            and f.message_type is not None
            and f.message_type.full_name == "google.protobuf.Duration"
        ):
            value = draw(durations)
        else:
            continue
        if f.is_repeated:
            if f.type == FD.TYPE_MESSAGE:
                continue
            extra = draw(st.integers(0, 300))
            value = [value] * draw(st.sampled_from([1, 2, extra]))
        out[f.name] = value
    return out


@st.composite
def events(draw: st.DrawFn) -> tuple[events_pb2.Event, int]:
    """An event, well-formed or not in any field, and its corrected time."""
    ev = events_pb2.Event(
        event_id=draw(st.sampled_from(["", "e-1", "x" * 64, "x" * 65])),
        seq=draw(st.sampled_from([0, 1, 7, 2**63 - 1, 2**63, 2**64 - 1])),
    )
    if draw(st.booleans()) or draw(st.booleans()):
        ev.device_time.seconds = draw(
            st.sampled_from([0, 1, NOW_US // 10**6, NOW_US // 10**6 + 3600, -5])
        )
        ev.device_time.nanos = draw(st.sampled_from([0, 1, 999_999_999, 10**9, -1]))
    name = draw(st.sampled_from([*PAYLOADS, None]))
    if name is not None:
        payload = getattr(ev, name)
        payload.SetInParent()
        for field, value in draw(payload_values(name)).items():
            target = getattr(payload, field)
            if isinstance(value, tuple):
                target.seconds, target.nanos = value
            elif isinstance(value, list):
                target.extend(value)
            else:
                setattr(payload, field, value)
    dt = ev.device_time
    # A clock offset that puts the event anywhere around the accepted window.
    offset = draw(
        st.sampled_from([0, MAX_FUTURE_US, MAX_FUTURE_US + 1, -MAX_AGE_US, -MAX_AGE_US - 1])
    )
    t_us = dt.seconds * 1_000_000 + dt.nanos // 1000 + offset
    return ev, t_us


@settings(max_examples=600, deadline=None)
@given(events())
def test_the_fast_path_names_the_problem_the_definition_names(drawn) -> None:
    ev, t_us = drawn
    body = ev.SerializeToString()
    which = ev.WhichOneof("payload")
    assert problem_of(ev, which, len(body), envelope_of(ev), t_us, NOW_US) == validate_event(
        ev, t_us, NOW_US
    )


def test_a_sound_event_passes_both_and_a_long_name_fails_both() -> None:
    ev = events_pb2.Event(event_id="e-1", seq=1)
    ev.device_time.seconds = NOW_US // 10**6
    ev.tap.app = "mail"
    t = NOW_US
    assert problem_of(ev, "tap", ev.ByteSize(), envelope_of(ev), t, NOW_US) is None
    assert validate_event(ev, t, NOW_US) is None
    ev.tap.app = "a" * (MAX_NAME_LENGTH + 1)
    p = problem_of(ev, "tap", ev.ByteSize(), envelope_of(ev), t, NOW_US)
    assert p is not None
    assert p == validate_event(ev, t, NOW_US)

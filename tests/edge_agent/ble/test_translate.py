"""The bridge's notification -> event translation, driven by the known-answer GATT vectors.

Every measurement vector in tests/vectors/ble_gatt.json goes through a fresh `Translator`: a
malformed payload raises GattParseError; a decoded one becomes events that carry the decoded
values, the sensor and the arrival time, or is left out and counted when the server would
quarantine it. No radio, no clock, no sink.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from pulsesync.edge_agent.ble.parsers import GattParseError, Location
from pulsesync.edge_agent.ble.translate import CONTACT_PROTO, LOCATION_PROTO, Translator
from pulsesync.limits import MAX_BPM, MAX_RR_MS, MAX_SPEED_M_PER_S
from pulsesync.timeutil import US_PER_S
from pulsesync.v1 import events_pb2

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parents[2] / "vectors" / "ble_gatt.json").read_text()
)["vectors"]
AT_US = 1_767_225_600_250_000
ADDRESS = "AA:BB:CC:DD:EE:01"
_SPECIAL = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# characteristic in the vectors -> the translator's method for it
METHODS = {
    "heart_rate_measurement": "heart_rate",
    "rsc_measurement": "rsc",
    "csc_measurement": "csc",
    "plx_continuous": "plx_continuous",
    "plx_spot_check": "plx_spot_check",
    "battery_level": "battery",
}


def _num(x: Any) -> Any:
    return _SPECIAL.get(x, x) if isinstance(x, str) else x


def _vectors(kind: str) -> list[Any]:
    return [
        pytest.param(v, id=f"{kind}-{v['hex'] or 'empty'}")
        for v in VECTORS
        if v["characteristic"] == kind
    ]


def _translate(v: dict[str, Any], translator: Translator | None = None) -> Any:
    t = translator or Translator(ADDRESS)
    return getattr(t, METHODS[v["characteristic"]])(bytes.fromhex(v["hex"]), AT_US)


def _stamped(events: list[events_pb2.Event]) -> None:
    for e in events:
        assert e.device_time.ToMicroseconds() == AT_US
        payload = getattr(e, e.WhichOneof("payload") or "")
        assert payload.sensor_id == ADDRESS


def test_every_measurement_kind_has_vectors() -> None:
    kinds = {v["characteristic"] for v in VECTORS}
    assert set(METHODS) <= kinds
    assert sum(v["characteristic"] in METHODS for v in VECTORS) >= 100


@pytest.mark.parametrize(
    "v", [v for k in METHODS for v in _vectors(k) if v.values[0]["expect"] == "error"]
)
def test_a_malformed_payload_raises_and_yields_nothing(v) -> None:
    with pytest.raises(GattParseError):
        _translate(v)


def _decoded(kind: str) -> list[Any]:
    return [v for v in _vectors(kind) if v.values[0]["expect"] != "error"]


@pytest.mark.parametrize("v", _decoded("heart_rate_measurement"))
def test_heart_rate(v) -> None:
    want = v["expect"]
    t = Translator(ADDRESS)
    t.location = Location.CHEST
    out = _translate(v, t)
    _stamped(out.events)
    rr_all = [float(r) for r in want["rr_intervals_ms"] or []]
    rr = [r for r in rr_all if 0.0 < r <= MAX_RR_MS]
    # Every RR interval is forwarded or counted, never lost silently.
    assert out.dropped.get("heart_rate.rr_intervals_ms", 0) == len(rr_all) - len(rr)
    in_range = 0 < want["bpm"] <= MAX_BPM
    assert out.dropped.get("heart_rate.bpm", 0) == (0 if in_range else 1)
    if in_range:
        assert len(out.events) == 1
    for e in out.events:
        hr = e.heart_rate
        assert hr.bpm == (want["bpm"] if in_range else 0)
        assert list(hr.rr_intervals_ms) == pytest.approx(rr)
        assert hr.location == LOCATION_PROTO[Location.CHEST]
        contact = {c.name.lower(): c for c in CONTACT_PROTO}[want["contact"]]
        assert hr.contact == CONTACT_PROTO[contact]
        if want["energy_expended_kj"] is not None:
            assert hr.energy_expended_kj == want["energy_expended_kj"]


@pytest.mark.parametrize("v", _decoded("rsc_measurement"))
def test_running_speed_and_cadence(v) -> None:
    want = v["expect"]
    out = _translate(v)
    _stamped(out.events)
    speed = _num(want["speed_m_per_s"])
    ok = math.isfinite(speed) and 0.0 <= speed <= MAX_SPEED_M_PER_S
    assert out.dropped.get("cadence.speed_m_per_s", 0) == (0 if ok else 1)
    # One notification is too short a window to integrate steps from.
    kinds = [e.WhichOneof("payload") for e in out.events]
    if ok:
        assert kinds == ["cadence"]
    else:  # the speed is left out: no event, or one without it
        assert kinds in ([], ["cadence"])
    for e in out.events:
        c = e.cadence
        assert c.cadence_per_min == want["cadence_per_min"]
        assert c.speed_m_per_s == pytest.approx(speed if ok else 0.0)
        walking = events_pb2.MOTION_KIND_WALKING
        assert c.motion == (events_pb2.MOTION_KIND_RUNNING if want["running"] else walking)


def test_cadence_integrates_into_steps_over_its_window() -> None:
    t = Translator(ADDRESS, steps_window_s=60.0)
    # 3.5 m/s at 170 steps a minute (the first RSC vector), once a second for a minute.
    payload = bytes.fromhex(
        next(v for v in VECTORS if v["characteristic"] == "rsc_measurement")["hex"]
    )
    steps = []
    for s in range(62):
        out = t.rsc(payload, AT_US + s * US_PER_S)
        steps += [e.steps for e in out.events if e.WhichOneof("payload") == "steps"]
    assert len(steps) == 1
    assert steps[0].count == pytest.approx(170, abs=3)
    assert steps[0].source == events_pb2.STEPS_SOURCE_CADENCE


@pytest.mark.parametrize("v", _decoded("csc_measurement"))
def test_a_first_cycling_measurement_only_primes_the_counters(v) -> None:
    out = _translate(v)
    assert out.events == []


@pytest.mark.parametrize("v", _decoded("plx_continuous") + _decoded("plx_spot_check"))
def test_oxygen_saturation(v) -> None:
    want = v["expect"]
    out = _translate(v)
    _stamped(out.events)
    spo2, pulse = _num(want["spo2_percent"]), _num(want["pulse_rate_bpm"])
    if math.isnan(spo2):  # no reading yet: nothing, and nothing counted
        assert (out.events, out.dropped) == ([], {})
        return
    if not 0.0 < spo2 <= 100.0:
        assert out.events == []
        assert out.dropped == {"oxygen_saturation.spo2_percent": 1}
        return
    (e,) = out.events
    assert e.oxygen_saturation.spo2_percent == pytest.approx(spo2, rel=1e-6)
    pulse_ok = math.isfinite(pulse) and 0.0 <= pulse <= MAX_BPM
    bad_pulse = 0 if pulse_ok or math.isnan(pulse) else 1
    assert out.dropped.get("oxygen_saturation.pulse_rate_bpm", 0) == bad_pulse
    assert e.oxygen_saturation.pulse_rate_bpm == pytest.approx(pulse if pulse_ok else 0.0)


@pytest.mark.parametrize("v", _decoded("battery_level"))
def test_battery_changes_become_events(v) -> None:
    t = Translator(ADDRESS)
    first = _translate(v, t)
    _stamped(first.events)
    assert [e.battery.level_percent for e in first.events] == [v["expect"]["percent"]]
    # Re-read on every reconnect: the same level again is no event.
    assert _translate(v, t).events == []

"""GATT parsers against known-answer vectors (tests/vectors/ble_gatt.json) and fuzzing."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
from bumble.profiles.heart_rate_service import HeartRateService
from hypothesis import given
from hypothesis import strategies as st

from pulsesync.edge_agent.ble.parsers import (
    BatteryLevel,
    BodySensorLocation,
    CrankData,
    CscMeasurement,
    GattParseError,
    HeartRateMeasurement,
    PlxContinuousMeasurement,
    PlxSpotCheckMeasurement,
    RscMeasurement,
    SensorContact,
    WheelData,
    float_to_sfloat,
    parse_utf8_string,
    sfloat_to_float,
)

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parents[2] / "vectors" / "ble_gatt.json").read_text()
)["vectors"]


def _vectors(kind: str) -> list[Any]:
    return [
        pytest.param(v, id=f"{kind}-{v['hex'] or 'empty'}")
        for v in VECTORS
        if v["characteristic"] == kind
    ]


_SPECIAL: dict[str, float] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _num(x: Any) -> Any:
    return _SPECIAL.get(x, x) if isinstance(x, str) else x


def _same(a: float | None, b: Any) -> bool:
    b = _num(b)
    if a is None or b is None:
        return a is None and b is None
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)


def test_every_vector_names_its_source_and_all_kinds_are_covered():
    kinds = {v["characteristic"] for v in VECTORS}
    assert kinds == {
        "heart_rate_measurement",
        "body_sensor_location",
        "battery_level",
        "device_information_string",
        "rsc_measurement",
        "csc_measurement",
        "sfloat",
        "plx_continuous",
        "plx_spot_check",
    }
    assert all(v["source"] for v in VECTORS)
    hr_flags = {
        int(v["hex"][:2], 16) & 0x1F
        for v in VECTORS
        if v["characteristic"] == "heart_rate_measurement" and v["expect"] != "error" and v["hex"]
    }
    assert hr_flags == set(range(32))
    rsc_flags = {
        int(v["hex"][:2], 16)
        for v in VECTORS
        if v["characteristic"] == "rsc_measurement" and v["expect"] != "error"
    }
    assert rsc_flags == set(range(8))


@pytest.mark.parametrize("v", _vectors("heart_rate_measurement"))
def test_heart_rate_measurement(v):
    data = bytes.fromhex(v["hex"])
    if v["expect"] == "error":
        with pytest.raises(GattParseError):
            HeartRateMeasurement.from_bytes(data)
        return
    m = HeartRateMeasurement.from_bytes(data)
    e = v["expect"]
    assert m.bpm == e["bpm"]
    assert m.contact is SensorContact(e["contact"])
    assert m.energy_expended_kj == e["energy_expended_kj"]
    assert m.rr_intervals == (None if e["rr_intervals"] is None else tuple(e["rr_intervals"]))
    assert list(m.rr_intervals_ms) == (e["rr_intervals_ms"] or [])
    # Re-encoding gives the same bytes except reserved flag bits, which receivers ignore.
    assert bytes(m)[1:] == data[1:]
    assert bytes(m)[0] == data[0] & 0x1F & ~(0 if data[0] & 0x04 else 0x02)


@pytest.mark.parametrize("v", _vectors("body_sensor_location"))
def test_body_sensor_location(v):
    data = bytes.fromhex(v["hex"])
    if v["expect"] == "error":
        with pytest.raises(GattParseError):
            BodySensorLocation.from_bytes(data)
        return
    m = BodySensorLocation.from_bytes(data)
    assert m.code == v["expect"]["code"]
    assert (None if m.location is None else m.location.name) == v["expect"]["location"]


@pytest.mark.parametrize("v", _vectors("battery_level"))
def test_battery_level(v):
    data = bytes.fromhex(v["hex"])
    if v["expect"] == "error":
        with pytest.raises(GattParseError, match="Battery Level"):
            BatteryLevel.from_bytes(data)
        return
    assert BatteryLevel.from_bytes(data).percent == v["expect"]["percent"]


@pytest.mark.parametrize("v", _vectors("device_information_string"))
def test_device_information_string(v):
    data = bytes.fromhex(v["hex"])
    if v["expect"] == "error":
        with pytest.raises(GattParseError, match="UTF-8"):
            parse_utf8_string("Manufacturer Name", data)
        return
    assert parse_utf8_string("Manufacturer Name", data) == v["expect"]["text"]


@pytest.mark.parametrize("v", _vectors("rsc_measurement"))
def test_rsc_measurement(v):
    data = bytes.fromhex(v["hex"])
    if v["expect"] == "error":
        with pytest.raises(GattParseError, match="RSC"):
            RscMeasurement.from_bytes(data)
        return
    m = RscMeasurement.from_bytes(data)
    e = v["expect"]
    assert m.speed_m_per_s == e["speed_m_per_s"]
    assert m.cadence_per_min == e["cadence_per_min"]
    assert _same(m.stride_length_m, e["stride_length_m"])
    assert _same(m.total_distance_m, e["total_distance_m"])
    assert m.running is e["running"]
    assert bytes(m) == data


@pytest.mark.parametrize("v", _vectors("csc_measurement"))
def test_csc_measurement(v):
    data = bytes.fromhex(v["hex"])
    if v["expect"] == "error":
        with pytest.raises(GattParseError, match="CSC"):
            CscMeasurement.from_bytes(data)
        return
    m = CscMeasurement.from_bytes(data)
    e = v["expect"]
    assert m.wheel == (WheelData(*e["wheel"]) if e["wheel"] else None)
    assert m.crank == (CrankData(*e["crank"]) if e["crank"] else None)
    assert bytes(m) == data


@pytest.mark.parametrize("v", _vectors("sfloat"))
def test_sfloat(v):
    (raw,) = struct.unpack("<H", bytes.fromhex(v["hex"]))
    assert _same(sfloat_to_float(raw), v["expect"]["value"])


@pytest.mark.parametrize("v", _vectors("plx_continuous"))
def test_plx_continuous(v):
    data = bytes.fromhex(v["hex"])
    if v["expect"] == "error":
        with pytest.raises(GattParseError, match="PLX"):
            PlxContinuousMeasurement.from_bytes(data)
        return
    m = PlxContinuousMeasurement.from_bytes(data)
    e = v["expect"]
    assert _same(m.spo2_percent, e["spo2_percent"])
    assert _same(m.pulse_rate_bpm, e["pulse_rate_bpm"])
    assert m.spo2_fast == (tuple(e["spo2_fast"]) if e["spo2_fast"] else None)
    assert m.spo2_slow == (tuple(e["spo2_slow"]) if e["spo2_slow"] else None)
    assert m.measurement_status == e["measurement_status"]
    assert m.device_sensor_status == e["device_sensor_status"]
    assert _same(m.pulse_amplitude_index, e["pulse_amplitude_index"])


@pytest.mark.parametrize("v", _vectors("plx_spot_check"))
def test_plx_spot_check(v):
    m = PlxSpotCheckMeasurement.from_bytes(bytes.fromhex(v["hex"]))
    e = v["expect"]
    assert _same(m.spo2_percent, e["spo2_percent"])
    assert _same(m.pulse_rate_bpm, e["pulse_rate_bpm"])
    assert m.timestamp == (tuple(e["timestamp"]) if e["timestamp"] else None)
    assert m.device_clock_not_set is e["device_clock_not_set"]


# --- an independent encoder agrees: bumble's own Heart Rate Service implementation ------------


@given(
    bpm=st.integers(0, 0xFFFF),
    contact=st.sampled_from([None, True, False]),
    energy=st.none() | st.integers(0, 0xFFFF),
    rr=st.none() | st.lists(st.integers(0, 0xFFFF), max_size=9),
)
def test_bumble_encoded_measurements_parse_back(bpm, contact, energy, rr):
    encoded = bytes(
        HeartRateService.HeartRateMeasurement(
            bpm, contact, energy, None if rr is None else [r / 1024 for r in rr]
        )
    )
    m = HeartRateMeasurement.from_bytes(encoded)
    assert m.bpm == bpm
    assert (
        m.contact
        is {
            None: SensorContact.NOT_SUPPORTED,
            True: SensorContact.DETECTED,
            False: SensorContact.NOT_DETECTED,
        }[contact]
    )
    assert m.energy_expended_kj == energy
    assert m.rr_intervals == (None if rr is None else tuple(rr))


# --- fuzzing: random bytes never raise anything but GattParseError ---------------------------

PARSERS = [
    HeartRateMeasurement.from_bytes,
    BodySensorLocation.from_bytes,
    BatteryLevel.from_bytes,
    RscMeasurement.from_bytes,
    CscMeasurement.from_bytes,
    PlxContinuousMeasurement.from_bytes,
    PlxSpotCheckMeasurement.from_bytes,
    lambda d: parse_utf8_string("Model Number", d),
]


@pytest.mark.parametrize("parse", PARSERS)
@given(data=st.binary(max_size=40))
def test_random_bytes_raise_only_gatt_parse_error(parse, data):
    error: GattParseError | None = None
    try:
        parse(data)
    except GattParseError as exc:
        error = exc
    if error is not None:
        assert error.data == data
        assert data.hex(" ") in str(error) or not data


@given(st.integers(-2045, 2045), st.integers(-8, 7))
def test_sfloat_round_trip(mantissa, exponent):
    value = mantissa * 10.0**exponent
    assert sfloat_to_float(float_to_sfloat(value, exponent)) == pytest.approx(
        value, rel=1e-9, abs=1e-12
    )


@given(st.binary(min_size=1, max_size=30))
def test_parsed_heart_rate_re_encodes_to_its_input(data):
    try:
        m = HeartRateMeasurement.from_bytes(data)
    except GattParseError:
        return
    reencoded = bytes(m)
    assert reencoded[1:] == data[1:]
    assert HeartRateMeasurement.from_bytes(reencoded) == m


@pytest.mark.parametrize("mantissa", [2046, 2047, -2046, -2047, -2048])
def test_sfloat_encoder_refuses_the_reserved_mantissas(mantissa):
    with pytest.raises(ValueError, match="SFLOAT"):
        float_to_sfloat(float(mantissa), 0)

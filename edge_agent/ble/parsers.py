"""GATT characteristic parsers for standard health sensors (Bluetooth SIG GATT Specification
Supplement layouts), as frozen dataclasses with `from_bytes` and `__bytes__`.

Every parser raises `GattParseError` (and nothing else) for malformed or truncated payloads,
so the bridge can count and log a bad notification and keep the connection loop running.
Reserved (RFU) flag bits are ignored on receive, as the specifications require.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass
from typing import Final, Self


class GattParseError(ValueError):
    """A characteristic value that does not match its specified layout."""

    def __init__(self, characteristic: str, data: bytes | bytearray, problem: str) -> None:
        self.characteristic = characteristic
        self.data = bytes(data)
        self.problem = problem
        super().__init__(
            f"{characteristic}: {problem} (payload {self.data.hex(' ') or 'empty'}); "
            "the sensor sent a value that does not follow the Bluetooth SIG layout, "
            "it is skipped and counted"
        )


class _Reader:
    """Little-endian cursor over a payload that raises GattParseError when it runs short."""

    __slots__ = ("characteristic", "data", "offset")

    def __init__(self, characteristic: str, data: bytes | bytearray) -> None:
        self.characteristic = characteristic
        self.data = bytes(data)
        self.offset = 0

    def fail(self, problem: str) -> GattParseError:
        return GattParseError(self.characteristic, self.data, problem)

    def take(self, fmt: str, what: str) -> int:
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.data):
            raise self.fail(
                f"truncated: {what} needs {size} byte(s) at offset {self.offset}, "
                f"only {len(self.data) - self.offset} left"
            )
        (value,) = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += size
        return int(value)

    def take_bytes(self, size: int, what: str) -> bytes:
        if self.offset + size > len(self.data):
            raise self.fail(f"truncated: {what} needs {size} byte(s) at offset {self.offset}")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def remaining(self) -> int:
        return len(self.data) - self.offset

    def done(self) -> None:
        if self.offset != len(self.data):
            raise self.fail(f"{len(self.data) - self.offset} unexpected trailing byte(s)")


# --- IEEE 11073-20601 SFLOAT (16-bit: 4-bit exponent, 12-bit mantissa, both signed) ---------

SFLOAT_NAN: Final = 0x07FF
SFLOAT_NRES: Final = 0x0800
SFLOAT_POSITIVE_INFINITY: Final = 0x07FE
SFLOAT_NEGATIVE_INFINITY: Final = 0x0802
SFLOAT_RESERVED: Final = 0x0801


def sfloat_to_float(raw: int) -> float:
    """Decode a 16-bit SFLOAT; NaN, NRes and the reserved value decode to NaN."""
    raw &= 0xFFFF
    if raw in (SFLOAT_NAN, SFLOAT_NRES, SFLOAT_RESERVED):
        return math.nan
    if raw == SFLOAT_POSITIVE_INFINITY:
        return math.inf
    if raw == SFLOAT_NEGATIVE_INFINITY:
        return -math.inf
    exponent = raw >> 12
    mantissa = raw & 0x0FFF
    if exponent >= 0x8:
        exponent -= 0x10
    if mantissa >= 0x800:
        mantissa -= 0x1000
    # round() strips binary noise: the value has at most 4 significant decimal digits.
    return round(mantissa * 10.0**exponent, max(0, -exponent))


def float_to_sfloat(value: float, exponent: int = -1) -> int:
    """Encode a value as SFLOAT with the given decimal exponent (for emulated sensors)."""
    if math.isnan(value):
        return SFLOAT_NAN
    mantissa = round(value / 10.0**exponent)
    # Mantissas +-2046..2048 are the reserved special values (NaN, NRes, INF), hence +-2045.
    if not -2045 <= mantissa <= 2045 or not -8 <= exponent <= 7:
        raise ValueError(f"{value} does not fit an SFLOAT with exponent {exponent}")
    return ((exponent & 0xF) << 12) | (mantissa & 0x0FFF)


# --- Heart Rate Measurement (0x2A37) ---------------------------------------------------------


class SensorContact(enum.Enum):
    """The sensor contact status bits of a Heart Rate Measurement."""

    NOT_SUPPORTED = "not_supported"
    DETECTED = "detected"
    NOT_DETECTED = "not_detected"


RR_UNITS_PER_SECOND: Final = 1024  # RR intervals are sent in 1/1024 s.


@dataclass(frozen=True, slots=True)
class HeartRateMeasurement:
    """A Heart Rate Measurement notification; RR intervals are kept in wire units (1/1024 s)."""

    bpm: int
    contact: SensorContact = SensorContact.NOT_SUPPORTED
    energy_expended_kj: int | None = None
    rr_intervals: tuple[int, ...] | None = None
    uint16_format: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.bpm <= (0xFFFF if self.uint16_format else 0xFF):
            raise ValueError(f"bpm {self.bpm} out of range for the chosen format")
        if self.energy_expended_kj is not None and not 0 <= self.energy_expended_kj <= 0xFFFF:
            raise ValueError("energy_expended_kj out of range")
        if self.rr_intervals is not None and any(not 0 <= r <= 0xFFFF for r in self.rr_intervals):
            raise ValueError("rr interval out of range")

    @property
    def rr_intervals_ms(self) -> tuple[float, ...]:
        """RR intervals in milliseconds (empty when the sensor sent none)."""
        return tuple(r * 1000.0 / RR_UNITS_PER_SECOND for r in self.rr_intervals or ())

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> Self:
        """Parse a notification payload."""
        r = _Reader("Heart Rate Measurement", data)
        flags = r.take("<B", "flags")
        uint16 = bool(flags & 0x01)
        bpm = r.take("<H" if uint16 else "<B", "heart rate value")
        if not flags & 0x04:
            contact = SensorContact.NOT_SUPPORTED
        elif flags & 0x02:
            contact = SensorContact.DETECTED
        else:
            contact = SensorContact.NOT_DETECTED
        energy = r.take("<H", "energy expended") if flags & 0x08 else None
        rr: tuple[int, ...] | None = None
        if flags & 0x10:
            if r.remaining() % 2:
                raise r.fail("RR interval list has an odd number of bytes")
            rr = tuple(r.take("<H", "RR interval") for _ in range(r.remaining() // 2))
        r.done()
        return cls(bpm, contact, energy, rr, uint16)

    def __bytes__(self) -> bytes:
        flags = 0x01 if self.uint16_format else 0
        out = struct.pack("<H" if self.uint16_format else "<B", self.bpm)
        if self.contact is not SensorContact.NOT_SUPPORTED:
            flags |= 0x04 | (0x02 if self.contact is SensorContact.DETECTED else 0)
        if self.energy_expended_kj is not None:
            flags |= 0x08
            out += struct.pack("<H", self.energy_expended_kj)
        if self.rr_intervals is not None:
            flags |= 0x10
            out += b"".join(struct.pack("<H", x) for x in self.rr_intervals)
        return bytes([flags]) + out


# --- Body Sensor Location (0x2A38) -----------------------------------------------------------


class Location(enum.IntEnum):
    """Body Sensor Location values (0x2A38)."""

    OTHER = 0
    CHEST = 1
    WRIST = 2
    FINGER = 3
    HAND = 4
    EAR_LOBE = 5
    FOOT = 6


@dataclass(frozen=True, slots=True)
class BodySensorLocation:
    """Where the sensor is worn; `location` is None for a reserved code."""

    code: int

    @property
    def location(self) -> Location | None:
        return Location(self.code) if self.code in Location._value2member_map_ else None

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> Self:
        """Parse a read value."""
        r = _Reader("Body Sensor Location", data)
        code = r.take("<B", "location")
        r.done()
        return cls(code)

    def __bytes__(self) -> bytes:
        return bytes([self.code])


# --- Battery Level (0x2A19) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatteryLevel:
    """Battery charge in percent (0-100)."""

    percent: int

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> Self:
        """Parse a read or notified value."""
        r = _Reader("Battery Level", data)
        percent = r.take("<B", "level")
        r.done()
        if percent > 100:
            raise r.fail(f"level {percent} is above 100 %")
        return cls(percent)

    def __bytes__(self) -> bytes:
        return bytes([self.percent])


# --- Device Information (0x180A) strings -----------------------------------------------------


def parse_utf8_string(characteristic: str, data: bytes | bytearray) -> str:
    """Decode a Device Information string (UTF-8; trailing NUL padding some sensors add is cut)."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GattParseError(characteristic, data, f"not UTF-8 ({exc.reason})") from exc
    return text.rstrip("\x00").strip()


@dataclass(frozen=True, slots=True)
class DeviceInformation:
    """The Device Information strings a sensor exposes (None when absent or unreadable)."""

    manufacturer: str | None = None
    model: str | None = None
    serial_number: str | None = None
    hardware_revision: str | None = None
    firmware_revision: str | None = None
    software_revision: str | None = None


# --- Running Speed and Cadence Measurement (0x2A53) -----------------------------------------

RSC_SPEED_UNITS_PER_M_S: Final = 256  # Instantaneous speed is sent in 1/256 m/s.


@dataclass(frozen=True, slots=True)
class RscMeasurement:
    """An RSC Measurement: speed (1/256 m/s), cadence (steps/min), optional stride and distance."""

    speed_raw: int
    cadence_per_min: int
    stride_length_cm: int | None = None
    total_distance_dm: int | None = None
    running: bool = False

    @property
    def speed_m_per_s(self) -> float:
        return self.speed_raw / RSC_SPEED_UNITS_PER_M_S

    @property
    def stride_length_m(self) -> float | None:
        return None if self.stride_length_cm is None else self.stride_length_cm / 100.0

    @property
    def total_distance_m(self) -> float | None:
        return None if self.total_distance_dm is None else self.total_distance_dm / 10.0

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> Self:
        """Parse a notification payload."""
        r = _Reader("RSC Measurement", data)
        flags = r.take("<B", "flags")
        speed = r.take("<H", "instantaneous speed")
        cadence = r.take("<B", "instantaneous cadence")
        stride = r.take("<H", "instantaneous stride length") if flags & 0x01 else None
        distance = r.take("<I", "total distance") if flags & 0x02 else None
        r.done()
        return cls(speed, cadence, stride, distance, bool(flags & 0x04))

    def __bytes__(self) -> bytes:
        flags = (
            (0x01 if self.stride_length_cm is not None else 0)
            | (0x02 if self.total_distance_dm is not None else 0)
            | (0x04 if self.running else 0)
        )
        out = struct.pack("<BHB", flags, self.speed_raw, self.cadence_per_min)
        if self.stride_length_cm is not None:
            out += struct.pack("<H", self.stride_length_cm)
        if self.total_distance_dm is not None:
            out += struct.pack("<I", self.total_distance_dm)
        return out


# --- Cycling Speed and Cadence Measurement (0x2A5B) -----------------------------------------


@dataclass(frozen=True, slots=True)
class WheelData:
    """Cumulative wheel revolutions (uint32) and the last wheel event time (uint16, 1/1024 s)."""

    revolutions: int
    last_event_time: int


@dataclass(frozen=True, slots=True)
class CrankData:
    """Cumulative crank revolutions (uint16) and the last crank event time (uint16, 1/1024 s)."""

    revolutions: int
    last_event_time: int


@dataclass(frozen=True, slots=True)
class CscMeasurement:
    """A CSC Measurement: cumulative counters; speed and cadence come from two of them."""

    wheel: WheelData | None = None
    crank: CrankData | None = None

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> Self:
        """Parse a notification payload."""
        r = _Reader("CSC Measurement", data)
        flags = r.take("<B", "flags")
        wheel = crank = None
        if flags & 0x01:
            wheel = WheelData(
                r.take("<I", "cumulative wheel revolutions"), r.take("<H", "last wheel event time")
            )
        if flags & 0x02:
            crank = CrankData(
                r.take("<H", "cumulative crank revolutions"), r.take("<H", "last crank event time")
            )
        r.done()
        return cls(wheel, crank)

    def __bytes__(self) -> bytes:
        flags = (0x01 if self.wheel else 0) | (0x02 if self.crank else 0)
        out = bytes([flags])
        if self.wheel:
            out += struct.pack("<IH", self.wheel.revolutions, self.wheel.last_event_time)
        if self.crank:
            out += struct.pack("<HH", self.crank.revolutions, self.crank.last_event_time)
        return out


# --- Pulse Oximeter (0x1822): PLX Continuous (0x2A5F) and Spot-Check (0x2A5E) ----------------


@dataclass(frozen=True, slots=True)
class PlxContinuousMeasurement:
    """A PLX Continuous Measurement (SpO2 in %, pulse rate in bpm; NaN when the sensor says so)."""

    spo2_percent: float
    pulse_rate_bpm: float
    spo2_fast: tuple[float, float] | None = None
    spo2_slow: tuple[float, float] | None = None
    measurement_status: int | None = None
    device_sensor_status: int | None = None
    pulse_amplitude_index: float | None = None

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> Self:
        """Parse a notification payload."""
        r = _Reader("PLX Continuous Measurement", data)
        flags = r.take("<B", "flags")
        spo2 = sfloat_to_float(r.take("<H", "SpO2"))
        pr = sfloat_to_float(r.take("<H", "pulse rate"))
        fast = slow = None
        if flags & 0x01:
            fast = (
                sfloat_to_float(r.take("<H", "SpO2 fast")),
                sfloat_to_float(r.take("<H", "PR fast")),
            )
        if flags & 0x02:
            slow = (
                sfloat_to_float(r.take("<H", "SpO2 slow")),
                sfloat_to_float(r.take("<H", "PR slow")),
            )
        status = r.take("<H", "measurement status") if flags & 0x04 else None
        device_status = None
        if flags & 0x08:
            device_status = int.from_bytes(r.take_bytes(3, "device and sensor status"), "little")
        pai = sfloat_to_float(r.take("<H", "pulse amplitude index")) if flags & 0x10 else None
        r.done()
        return cls(spo2, pr, fast, slow, status, device_status, pai)


@dataclass(frozen=True, slots=True)
class PlxSpotCheckMeasurement:
    """A PLX Spot-Check Measurement (the timestamp, when present, is kept as raw fields)."""

    spo2_percent: float
    pulse_rate_bpm: float
    timestamp: tuple[int, int, int, int, int, int] | None = None
    measurement_status: int | None = None
    device_sensor_status: int | None = None
    pulse_amplitude_index: float | None = None
    device_clock_not_set: bool = False

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> Self:
        """Parse an indication payload."""
        r = _Reader("PLX Spot-Check Measurement", data)
        flags = r.take("<B", "flags")
        spo2 = sfloat_to_float(r.take("<H", "SpO2"))
        pr = sfloat_to_float(r.take("<H", "pulse rate"))
        ts = None
        if flags & 0x01:
            year = r.take("<H", "timestamp year")
            rest = tuple(r.take("<B", "timestamp field") for _ in range(5))
            ts = (year, rest[0], rest[1], rest[2], rest[3], rest[4])
        status = r.take("<H", "measurement status") if flags & 0x02 else None
        device_status = None
        if flags & 0x04:
            device_status = int.from_bytes(r.take_bytes(3, "device and sensor status"), "little")
        pai = sfloat_to_float(r.take("<H", "pulse amplitude index")) if flags & 0x08 else None
        r.done()
        return cls(spo2, pr, ts, status, device_status, pai, bool(flags & 0x10))

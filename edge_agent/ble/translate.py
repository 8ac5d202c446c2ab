"""From GATT notifications to events: the pure half of the wearable bridge.

A `Translator` per sensor turns the bytes of one notification, with the host time it arrived,
into the events to record and the values it left out because the server would quarantine
them (pulsesync.limits). It keeps what the translation needs from one notification to the
next (the RR window behind RMSSD, cadence integrated into steps, the CSC revolution
counters, the last battery level), and nothing else: no radio, no clock, no sink, no logging.
The bridge (bridge.py) owns the link and hands each notification here; tests drive it from
the known-answer vectors in tests/vectors/ble_gatt.json.

A malformed payload raises `GattParseError` (the bridge counts it and carries on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

from google.protobuf import duration_pb2

from pulsesync.edge_agent.ble.derived import (
    DEFAULT_WHEEL_CIRCUMFERENCE_M,
    CscCalculator,
    RmssdWindow,
    StepsFromCadence,
)
from pulsesync.edge_agent.ble.parsers import (
    BatteryLevel,
    CscMeasurement,
    HeartRateMeasurement,
    Location,
    PlxContinuousMeasurement,
    PlxSpotCheckMeasurement,
    RscMeasurement,
    SensorContact,
)
from pulsesync.limits import MAX_BPM, MAX_RR_MS, MAX_SPEED_M_PER_S
from pulsesync.timeutil import timestamp
from pulsesync.v1 import events_pb2

LOCATION_PROTO: Final[dict[Location, int]] = {
    loc: loc.value + 1
    for loc in Location  # the proto enum is shifted so zero means unset
}
CONTACT_PROTO: Final[dict[SensorContact, int]] = {
    SensorContact.NOT_SUPPORTED: events_pb2.SENSOR_CONTACT_NOT_SUPPORTED,
    SensorContact.DETECTED: events_pb2.SENSOR_CONTACT_DETECTED,
    SensorContact.NOT_DETECTED: events_pb2.SENSOR_CONTACT_NOT_DETECTED,
}


@dataclass(slots=True)
class Translation:
    """What one notification became: events stamped with its arrival time, and the values
    left out, by field name."""

    events: list[events_pb2.Event] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)

    def record(self, event: events_pb2.Event, at_us: int) -> None:
        event.device_time.CopyFrom(timestamp(at_us))
        self.events.append(event)

    def drop(self, name: str, count: int = 1) -> None:
        """Count a value not forwarded because the server would quarantine its event."""
        if count:
            self.dropped[name] = self.dropped.get(name, 0) + count


def _duration(seconds: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(seconds), nanos=int(seconds % 1 * 1e9))


class Translator:
    """Translates one sensor's notifications; `address` names the sensor in its events."""

    def __init__(
        self,
        address: str,
        *,
        steps_window_s: float = 60.0,
        rmssd_window_s: float = 60.0,
        wheel_circumference_m: float = DEFAULT_WHEEL_CIRCUMFERENCE_M,
    ) -> None:
        self.address = address
        # Where the sensor is worn (read once per connection), for heart-rate events.
        self.location: Location | None = None
        self._rmssd = RmssdWindow(rmssd_window_s)
        self._steps = StepsFromCadence(steps_window_s)
        self._csc = CscCalculator(wheel_circumference_m)
        self._last_battery: int | None = None

    def reset(self) -> None:
        """The link dropped: windows and counters from before it would span the gap."""
        self._rmssd.reset()
        self._steps.reset()
        self._csc.reset()  # counters from before the drop would alias across the gap

    def heart_rate(self, data: bytes | bytearray, at_us: int) -> Translation:
        """A Heart Rate Measurement (0x2A37)."""
        out = Translation()
        m = HeartRateMeasurement.from_bytes(data)
        rr = [r for r in m.rr_intervals_ms if 0.0 < r <= MAX_RR_MS]
        out.drop("heart_rate.rr_intervals_ms", len(m.rr_intervals_ms) - len(rr))
        hr = events_pb2.HeartRate(
            sensor_id=self.address,
            rr_intervals_ms=rr,
            contact=CONTACT_PROTO[m.contact],  # type: ignore[arg-type]
        )
        if 0 < m.bpm <= MAX_BPM:
            hr.bpm = m.bpm
        else:
            # 0 (no skin contact) or 65535: left absent ("not measured"); the RR intervals of
            # the same notification are still real beats.
            out.drop("heart_rate.bpm")
            if not rr:
                return out  # nothing measured at all: no event
        if m.energy_expended_kj is not None:
            hr.energy_expended_kj = m.energy_expended_kj
        if self.location is not None:
            hr.location = LOCATION_PROTO[self.location]  # type: ignore[assignment]
        if rr and (window := self._rmssd.add(rr)) is not None:
            rmssd, span_s, _count = window
            hr.rmssd_ms = rmssd
            hr.rmssd_window.CopyFrom(_duration(span_s))
        out.record(events_pb2.Event(heart_rate=hr), at_us)
        return out

    def rsc(self, data: bytes | bytearray, at_us: int) -> Translation:
        """A Running Speed and Cadence Measurement (0x2A53), and the steps it integrates to."""
        out = Translation()
        m = RscMeasurement.from_bytes(data)
        cadence = events_pb2.Cadence(
            sensor_id=self.address,
            motion=events_pb2.MOTION_KIND_RUNNING if m.running else events_pb2.MOTION_KIND_WALKING,
            cadence_per_min=float(m.cadence_per_min),
        )
        speed = m.speed_m_per_s
        if math.isfinite(speed) and 0.0 <= speed <= MAX_SPEED_M_PER_S:
            cadence.speed_m_per_s = speed
        else:
            out.drop("cadence.speed_m_per_s")  # absent; the cadence is still measured
        if m.stride_length_m is not None:
            cadence.stride_length_m = m.stride_length_m
        if m.total_distance_m is not None:
            cadence.total_distance_m = m.total_distance_m
        out.record(events_pb2.Event(cadence=cadence), at_us)
        if (window := self._steps.add(at_us / 1e6, float(m.cadence_per_min))) is not None:
            count, span_s = window
            steps = events_pb2.Steps(
                sensor_id=self.address,
                count=count,
                interval=_duration(span_s),
                source=events_pb2.STEPS_SOURCE_CADENCE,
            )
            out.record(events_pb2.Event(steps=steps), at_us)
        return out

    def csc(self, data: bytes | bytearray, at_us: int) -> Translation:
        """A Cycling Speed and Cadence Measurement (0x2A5B): rates from successive counters."""
        out = Translation()
        rates = self._csc.update(CscMeasurement.from_bytes(data), at_us / 1e6)
        out.drop("cadence.csc_rate", rates.rejected)
        if rates.speed_m_per_s is None and rates.cadence_rpm is None:
            return out
        # A crank-only sensor has no speed and a wheel-only one no cadence: those stay absent
        # ("not measured") rather than 0, which would read as standing still.
        cadence = events_pb2.Cadence(sensor_id=self.address, motion=events_pb2.MOTION_KIND_CYCLING)
        if rates.cadence_rpm is not None:
            cadence.cadence_per_min = rates.cadence_rpm
        if rates.speed_m_per_s is not None:
            cadence.speed_m_per_s = rates.speed_m_per_s
        out.record(events_pb2.Event(cadence=cadence), at_us)
        return out

    def plx_continuous(self, data: bytes | bytearray, at_us: int) -> Translation:
        """A PLX Continuous Measurement (0x2A5F)."""
        m = PlxContinuousMeasurement.from_bytes(data)
        return self._plx(m.spo2_percent, m.pulse_rate_bpm, at_us)

    def plx_spot_check(self, data: bytes | bytearray, at_us: int) -> Translation:
        """A PLX Spot-Check Measurement (0x2A5E)."""
        m = PlxSpotCheckMeasurement.from_bytes(data)
        return self._plx(m.spo2_percent, m.pulse_rate_bpm, at_us)

    def _plx(self, spo2: float, pulse_rate: float, at_us: int) -> Translation:
        out = Translation()
        if math.isnan(spo2):
            return out  # NaN: the oximeter has no reading yet (not an error)
        if not 0.0 < spo2 <= 100.0:  # +-inf, negative or zero
            out.drop("oxygen_saturation.spo2_percent")
            return out
        reading = events_pb2.OxygenSaturation(sensor_id=self.address, spo2_percent=spo2)
        if math.isfinite(pulse_rate) and 0.0 < pulse_rate <= MAX_BPM:
            reading.pulse_rate_bpm = pulse_rate
        elif not math.isnan(pulse_rate):  # NaN: not reported, left absent without a count
            out.drop("oxygen_saturation.pulse_rate_bpm")
        out.record(events_pb2.Event(oxygen_saturation=reading), at_us)
        return out

    def battery(self, data: bytes | bytearray, at_us: int) -> Translation:
        """A Battery Level (0x2A19), notified or read; only a change becomes an event."""
        out = Translation()
        level = BatteryLevel.from_bytes(data).percent
        if level == self._last_battery:
            return out  # re-read on every reconnect; only changes are events
        self._last_battery = level
        out.record(
            events_pb2.Event(
                battery=events_pb2.Battery(sensor_id=self.address, level_percent=level)
            ),
            at_us,
        )
        return out

"""Emulated BLE sensors: bumble peripherals on a `VirtualAir`, serving standard GATT services.

A heart-rate strap (Heart Rate, Battery, Device Information; HR with RR intervals, body
location) and a running footpod (Running Speed and Cadence, Battery, Device Information),
driven by seeded physiological models; a spot-check pulse oximeter (PLX Spot-Check by
indication, a battery level that can only be read) and a cycling speed/cadence sensor (wheel
and/or crank counters), which send what the test or caller asks for. Each notification goes out through bumble's GATT
server only to a connection that enabled it in the CCCD, exactly as on a real sensor; the
sensor keeps a log of what it delivered so tests can compare it with what was stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Sequence
from typing import Any, Final

from bumble import core, gatt, hci
from bumble.core import AdvertisingData
from bumble.device import Connection, Device
from bumble.profiles.battery_service import BatteryService
from bumble.profiles.device_information_service import DeviceInformationService
from bumble.profiles.heart_rate_service import HeartRateService

from pulsesync.edge_agent.ble.bumble_backend import VirtualAir, make_device
from pulsesync.edge_agent.ble.parsers import (
    CrankData,
    CscMeasurement,
    RscMeasurement,
    WheelData,
    float_to_sfloat,
)
from pulsesync.edge_agent.ble.physiology import Activity, ActivityTrack, HeartModel, StrideModel

# Advertising every 20 ms keeps virtual scans short; real sensors use 100 ms-1 s.
ADVERTISING_INTERVAL_MS: Final = 20.0
# A strap includes Energy Expended about every 10th measurement (as the HRS spec suggests).
ENERGY_EVERY: Final = 10
RSC_MEASUREMENT: Final = core.UUID.from_16_bits(0x2A53, "RSC Measurement")
RSC_FEATURE: Final = core.UUID.from_16_bits(0x2A54, "RSC Feature")
# RSC Feature: stride length, total distance and walking/running status supported.
RSC_FEATURE_BITS: Final = 0x0007
PLX_SPOT_CHECK_MEASUREMENT: Final = core.UUID.from_16_bits(0x2A5E, "PLX Spot-Check Measurement")
PLX_FEATURES: Final = core.UUID.from_16_bits(0x2A60, "PLX Features")
CSC_MEASUREMENT: Final = core.UUID.from_16_bits(0x2A5B, "CSC Measurement")
CSC_FEATURE: Final = core.UUID.from_16_bits(0x2A5C, "CSC Feature")
BATTERY_LEVEL: Final = core.UUID.from_16_bits(0x2A19, "Battery Level")


def _advertising_data(name: str, services: Sequence[int]) -> bytes:
    uuids = b"".join(struct.pack("<H", s) for s in services)
    return bytes(
        AdvertisingData(
            [
                (AdvertisingData.FLAGS, bytes([0x06])),  # LE General Discoverable, no BR/EDR
                (AdvertisingData.COMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS, uuids),
                (AdvertisingData.COMPLETE_LOCAL_NAME, name.encode()),
            ]
        )
    )


class EmulatedSensor:
    """A bumble peripheral on the virtual air, with a delivery log and fault injection."""

    def __init__(
        self, air: VirtualAir, address: str, name: str, services: Sequence[int], seed: int
    ) -> None:
        self.air = air
        self.address = address
        self.name = name
        self.seed = seed
        self.device: Device = make_device(air.link, address, name)
        self._adv = _advertising_data(name, services)
        self.delivered: list[bytes] = []  # measurement payloads sent to a subscribed link
        self.produced = 0  # measurements generated, delivered or not
        self.in_range = True
        self.battery = 100
        self._battery_char: gatt.Characteristic[Any] | None = None
        self.measurement_char: gatt.Characteristic[Any]
        self._started = False

    async def start(self) -> None:
        """Power on and advertise (connectable, restarting after each disconnection)."""
        if self._started:
            return
        self._started = True
        await self.device.power_on()
        await self._advertise()

    async def _advertise(self) -> None:
        await self.device.start_advertising(
            auto_restart=True,
            advertising_data=self._adv,
            advertising_interval_min=ADVERTISING_INTERVAL_MS,
            advertising_interval_max=ADVERTISING_INTERVAL_MS,
        )

    @property
    def connections(self) -> list[Connection]:
        return list(self.device.connections.values())

    def subscribed(self, characteristic: gatt.Characteristic[Any]) -> list[Connection]:
        """Connections whose CCCD enables notifications of this characteristic."""
        out = []
        for connection in self.connections:
            cccd = self.device.gatt_server.subscribers.get(connection, {}).get(
                characteristic.handle
            )
            if cccd and cccd[0] & 0x03:  # notifications or indications enabled
                out.append(connection)
        return out

    async def _notify(self, characteristic: gatt.Characteristic[Any], value: Any) -> bool:
        targets = self.subscribed(characteristic)
        indicate = not characteristic.properties & gatt.Characteristic.Properties.NOTIFY
        for connection in targets:
            if indicate:  # waits for the central's confirmation, as the ATT protocol does
                await self.device.indicate_subscriber(connection, characteristic, value)
            else:
                await self.device.notify_subscriber(connection, characteristic, value)
        return bool(targets)

    async def drop_link(self, reason: int = hci.HCI_CONNECTION_TIMEOUT_ERROR) -> int:
        """Drop every connection as a supervision timeout would; returns how many."""
        dropped = 0
        for connection in self.connections:
            with contextlib.suppress(core.BaseBumbleError, hci.HCI_Error):
                await connection.disconnect(reason)
                dropped += 1
        return dropped

    async def leave(self) -> None:
        """Walk out of range: stop advertising and drop the link."""
        self.in_range = False
        await self.device.stop_advertising()
        await self.drop_link()
        # auto_restart may have re-armed advertising on the disconnection just processed.
        await asyncio.sleep(0)
        with contextlib.suppress(core.BaseBumbleError, hci.HCI_Error):
            await self.device.stop_advertising()

    async def come_back(self) -> None:
        """Return in range: advertise again."""
        self.in_range = True
        await self._advertise()

    async def set_battery(self, percent: int) -> None:
        """Change the battery level and notify subscribers."""
        self.battery = percent
        if self._battery_char is not None:
            await self._notify(self._battery_char, percent)  # the adapter packs the uint8

    async def tick(self) -> bytes | None:
        """Produce one measurement; returns its payload when it reached a subscriber."""
        raise NotImplementedError

    async def send_raw(self, payload: bytes) -> bool:
        """Notify arbitrary bytes on the measurement characteristic (a misbehaving sensor)."""
        return await self._notify(self.measurement_char, payload)

    async def run(self, rate_hz: float, count: int | None = None) -> None:
        """Produce measurements at rate_hz (real time), `count` of them or until cancelled."""
        loop = asyncio.get_running_loop()
        period = 1.0 / rate_hz
        next_at = loop.time()
        n = 0
        while count is None or n < count:
            await self.tick()
            n += 1
            next_at += period
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    async def close(self) -> None:
        """Drop links and power off."""
        await self.drop_link(hci.HCI_REMOTE_DEVICE_TERMINATED_CONNECTION_DUE_TO_POWER_OFF_ERROR)
        with contextlib.suppress(Exception):
            await self.device.power_off()


class HeartRateStrap(EmulatedSensor):
    """A chest strap: HR + RR each emulated second, energy expended, battery, device info."""

    def __init__(
        self,
        air: VirtualAir,
        address: str = "D1:5E:A5:00:00:01",
        *,
        name: str = "PulseStrap",
        seed: int = 1,
        seconds_per_tick: float = 1.0,
    ) -> None:
        super().__init__(air, address, name, (0x180D, 0x180F, 0x180A), seed)
        self.seconds_per_tick = seconds_per_tick
        self.heart = HeartModel(seed, ActivityTrack(seed))
        self._t = 0.0
        self.hrs = HeartRateService(
            read_heart_rate_measurement=lambda _c: HeartRateService.HeartRateMeasurement(
                self.heart.bpm
            ),
            body_sensor_location=HeartRateService.BodySensorLocation.CHEST,
        )
        self.measurement_char = self.hrs.heart_rate_measurement_characteristic
        battery = BatteryService(read_battery_level=lambda _c: self.battery)
        self._battery_char = battery.battery_level_characteristic
        self.device.add_services(
            [
                self.hrs,
                battery,
                DeviceInformationService(
                    manufacturer_name="PulseSync Labs",
                    model_number="HRM-E1",
                    serial_number=f"E1-{seed:06d}",
                    hardware_revision="1.0",
                    firmware_revision="2.4.1",
                    software_revision="emulated",
                ),
            ]
        )

    async def tick(self) -> bytes | None:
        """One Heart Rate Measurement (encoded by bumble's own HRS implementation)."""
        self._t += self.seconds_per_tick
        rr = self.heart.beats_until(self._t)
        self.produced += 1
        measurement = HeartRateService.HeartRateMeasurement(
            heart_rate=self.heart.bpm,
            sensor_contact_detected=True,
            energy_expended=(
                min(0xFFFF, int(self.heart.energy_kj))
                if self.produced % ENERGY_EVERY == 0
                else None
            ),
            rr_intervals=[r / 1024 for r in rr],
        )
        payload = bytes(measurement)
        if await self._notify(self.measurement_char, payload):
            self.delivered.append(payload)
            return payload
        return None


class Footpod(EmulatedSensor):
    """A running footpod: RSC Measurement with walking/running status, stride and distance."""

    def __init__(
        self,
        air: VirtualAir,
        address: str = "D1:5E:A5:00:00:02",
        *,
        name: str = "PulseStride",
        seed: int = 1,
        seconds_per_tick: float = 1.0,
    ) -> None:
        super().__init__(air, address, name, (0x1814, 0x180F, 0x180A), seed)
        self.seconds_per_tick = seconds_per_tick
        self.stride = StrideModel(seed + 1, ActivityTrack(seed))
        self._t = 0.0
        self.measurement_char: gatt.Characteristic[Any] = gatt.Characteristic(
            RSC_MEASUREMENT,
            gatt.Characteristic.Properties.NOTIFY,
            gatt.Characteristic.Permissions(0),
            b"",
        )
        rsc = gatt.Service(
            gatt.GATT_RUNNING_SPEED_AND_CADENCE_SERVICE,
            [
                self.measurement_char,
                gatt.Characteristic(
                    RSC_FEATURE,
                    gatt.Characteristic.Properties.READ,
                    gatt.Characteristic.READABLE,
                    struct.pack("<H", RSC_FEATURE_BITS),
                ),
            ],
        )
        battery = BatteryService(read_battery_level=lambda _c: self.battery)
        self._battery_char = battery.battery_level_characteristic
        self.device.add_services(
            [
                rsc,
                battery,
                DeviceInformationService(
                    manufacturer_name="PulseSync Labs",
                    model_number="RSC-E1",
                    serial_number=f"R1-{seed:06d}",
                    firmware_revision="1.7.0",
                ),
            ]
        )

    async def tick(self) -> bytes | None:
        """One RSC Measurement."""
        self._t += self.seconds_per_tick
        bout, cadence, speed = self.stride.sample(self._t)
        self.produced += 1
        stride_cm = round(speed / (cadence / 60.0) * 100) if cadence > 0 else 0
        measurement = RscMeasurement(
            speed_raw=min(0xFFFF, round(speed * 256)),
            cadence_per_min=min(0xFF, round(cadence)),
            stride_length_cm=min(0xFFFF, stride_cm),
            total_distance_dm=round(self.stride.distance_m * 10) & 0xFFFFFFFF,
            running=bout.activity == Activity.RUNNING,
        )
        payload = bytes(measurement)
        if await self._notify(self.measurement_char, payload):
            self.delivered.append(payload)
            return payload
        return None


def _read_only_battery(sensor: EmulatedSensor) -> gatt.Service:
    """A Battery service whose level can be read but does not notify (many cheap sensors)."""
    return gatt.Service(
        gatt.GATT_BATTERY_SERVICE,
        [
            gatt.Characteristic(
                BATTERY_LEVEL,
                gatt.Characteristic.Properties.READ,
                gatt.Characteristic.READABLE,
                gatt.CharacteristicValue(read=lambda _c: bytes([sensor.battery])),
            )
        ],
    )


class SpotCheckOximeter(EmulatedSensor):
    """A finger oximeter with only PLX Spot-Check (0x2A5E, indicated) and a read-only battery."""

    def __init__(
        self,
        air: VirtualAir,
        address: str = "D1:5E:A5:00:00:03",
        *,
        name: str = "PulseOx",
        seed: int = 1,
    ) -> None:
        super().__init__(air, address, name, (0x1822, 0x180F), seed)
        self.measurement_char = gatt.Characteristic(
            PLX_SPOT_CHECK_MEASUREMENT,
            gatt.Characteristic.Properties.INDICATE,
            gatt.Characteristic.Permissions(0),
            b"",
        )
        plx = gatt.Service(
            gatt.GATT_PULSE_OXIMETER_SERVICE,
            [
                self.measurement_char,
                gatt.Characteristic(
                    PLX_FEATURES,
                    gatt.Characteristic.Properties.READ,
                    gatt.Characteristic.READABLE,
                    struct.pack("<H", 0),
                ),
            ],
        )
        # Not notified: the bridge has to re-read it to follow the level.
        self.device.add_services([plx, _read_only_battery(self)])

    @staticmethod
    def payload(spo2_percent: float, pulse_rate_bpm: float) -> bytes:
        """A Spot-Check Measurement without the optional fields (NaN: "not available")."""
        return struct.pack(
            "<BHH", 0, float_to_sfloat(spo2_percent), float_to_sfloat(pulse_rate_bpm, 0)
        )

    async def measure(self, spo2_percent: float, pulse_rate_bpm: float) -> bytes | None:
        """Indicate one spot check; returns its payload when it reached a subscriber."""
        self.produced += 1
        payload = self.payload(spo2_percent, pulse_rate_bpm)
        if await self._notify(self.measurement_char, payload):
            self.delivered.append(payload)
            return payload
        return None

    async def tick(self) -> bytes | None:
        """One plausible reading."""
        return await self.measure(97.0, 64.0)


class CyclingSensor(EmulatedSensor):
    """A CSC sensor: wheel and/or crank counters, advanced by `pedal()` (read-only battery)."""

    def __init__(
        self,
        air: VirtualAir,
        address: str = "D1:5E:A5:00:00:04",
        *,
        name: str = "PulseCrank",
        seed: int = 1,
        wheel: bool = True,
        crank: bool = True,
    ) -> None:
        super().__init__(air, address, name, (0x1816, 0x180F), seed)
        self.wheel = WheelData(0, 0) if wheel else None
        self.crank = CrankData(0, 0) if crank else None
        self.measurement_char = gatt.Characteristic(
            CSC_MEASUREMENT,
            gatt.Characteristic.Properties.NOTIFY,
            gatt.Characteristic.Permissions(0),
            b"",
        )
        features = (0x01 if wheel else 0) | (0x02 if crank else 0)
        csc = gatt.Service(
            gatt.GATT_CYCLING_SPEED_AND_CADENCE_SERVICE,
            [
                self.measurement_char,
                gatt.Characteristic(
                    CSC_FEATURE,
                    gatt.Characteristic.Properties.READ,
                    gatt.Characteristic.READABLE,
                    struct.pack("<H", features),
                ),
            ],
        )
        self.device.add_services([csc, _read_only_battery(self)])

    async def pedal(self, seconds: float, wheel_revs: int = 0, crank_revs: int = 0) -> bytes | None:
        """Advance the counters by `seconds` of riding and notify the new cumulative values."""
        ticks = round(seconds * 1024)
        if self.wheel is not None:
            self.wheel = WheelData(
                (self.wheel.revolutions + wheel_revs) & 0xFFFFFFFF,
                (self.wheel.last_event_time + ticks) & 0xFFFF,
            )
        if self.crank is not None:
            self.crank = CrankData(
                (self.crank.revolutions + crank_revs) & 0xFFFF,
                (self.crank.last_event_time + ticks) & 0xFFFF,
            )
        self.produced += 1
        payload = bytes(CscMeasurement(self.wheel, self.crank))
        if await self._notify(self.measurement_char, payload):
            self.delivered.append(payload)
            return payload
        return None

    async def tick(self) -> bytes | None:
        """One second at 60 rpm and ~8.4 m/s (4 wheel revolutions of 2.105 m)."""
        return await self.pedal(1.0, wheel_revs=4, crank_revs=1)

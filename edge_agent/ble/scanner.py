"""Scanning for sensors that advertise a supported service (`pulsesync-agent scan`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from bleak import BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData

from pulsesync.edge_agent.ble import uuids
from pulsesync.edge_agent.ble.backends import BleBackends


@dataclass(frozen=True, slots=True)
class FoundSensor:
    """A device seen advertising at least one supported service."""

    address: str
    name: str | None
    services: tuple[str, ...]  # short names, e.g. ("heart_rate",)
    rssi: int

    def line(self) -> str:
        """One human-readable line for the CLI."""
        return f"{self.address}  {self.rssi:4d} dBm  {self.name or '(no name)':<20}  {', '.join(self.services)}"


async def scan(duration_s: float, backends: BleBackends | None = None) -> list[FoundSensor]:
    """Scan for duration_s and return supported sensors, strongest signal first."""
    found: dict[str, FoundSensor] = {}

    def seen(device: BLEDevice, adv: AdvertisementData) -> None:
        services = tuple(
            sorted(
                {
                    uuids.SUPPORTED_SERVICES[u]
                    for u in adv.service_uuids
                    if u in uuids.SUPPORTED_SERVICES
                }
            )
        )
        if services:
            found[device.address] = FoundSensor(
                device.address, adv.local_name or device.name, services, adv.rssi
            )

    # Filtering on service UUIDs is required on some macOS versions to see anything at all.
    kwargs: dict[str, Any] = {"service_uuids": list(uuids.SUPPORTED_SERVICES)}
    if backends is not None and backends.scanner is not None:
        kwargs["backend"] = backends.scanner
    async with BleakScanner(seen, **kwargs):
        await asyncio.sleep(duration_s)
    return sorted(found.values(), key=lambda s: (-s.rssi, s.address))


def explain_adapter_error(exc: BaseException) -> str | None:
    """One line saying which part of the Bluetooth stack is missing and how to fix it, or None
    when the error is not about a missing/off adapter."""
    from bleak.exc import BleakBluetoothNotAvailableError, BleakDBusError

    if isinstance(exc, FileNotFoundError):
        # bleak's BlueZ backend connects to the system D-Bus socket first.
        return (
            "no Bluetooth: the system D-Bus is not running (no /run/dbus/system_bus_socket); "
            "Linux: install and start dbus and bluez (`systemctl start dbus bluetooth`); "
            "in a container, mount /run/dbus from the host"
        )
    if isinstance(exc, BleakDBusError) and "org.bluez" in str(exc):
        return (
            "no Bluetooth: the BlueZ daemon is not running (org.bluez was not provided); "
            "Linux: install bluez and run `systemctl enable --now bluetooth`"
        )
    if isinstance(exc, BleakBluetoothNotAvailableError):
        return (
            f"no Bluetooth adapter, or Bluetooth is off ({exc}); Linux: `rfkill unblock "
            "bluetooth` and `bluetoothctl power on`; macOS: turn Bluetooth on and allow the "
            "terminal in Privacy & Security > Bluetooth; Windows: turn Bluetooth on in Settings"
        )
    return None

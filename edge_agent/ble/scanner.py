"""Scanning for sensors that advertise a supported service (`pulsesync-agent scan`), and the
state of the Bluetooth adapter (ready, off, absent, not permitted, no Bluetooth stack) for
`scan`, `run --source wearable` and `status`."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Any, Final

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


class AdapterState(enum.Enum):
    """Whether the bridge can use Bluetooth, and if not, which part is missing."""

    READY = "ready"  # an adapter is present, powered and ours to use
    OFF = "off"  # present but powered off (or blocked by rfkill)
    ABSENT = "absent"  # no adapter, or none that can act as a BLE central
    NO_PERMISSION = "no permission"  # the OS or the user denied this process Bluetooth
    NO_STACK = "no Bluetooth stack"  # Linux: D-Bus or the BlueZ daemon is not running


@dataclass(frozen=True, slots=True)
class AdapterStatus:
    """The adapter's state and, unless ready, the one line saying how to fix it."""

    state: AdapterState
    problem: str | None = None

    def line(self) -> str:
        """One line for `pulsesync-agent status`."""
        if self.state is AdapterState.READY:
            return "ready (adapter present and powered)"
        return f"{self.state.value}: {self.problem}"


# Long enough for the platform to report a missing or powered-off adapter, short enough not to
# delay the first connection (or `status`) noticeably.
ADAPTER_PROBE_S: Final = 0.5
# A stack that has not answered a scan request within this (e.g. a wedged bluetoothd) is
# reported as not answering rather than left to hang `status` or the start of `run`.
ADAPTER_ANSWER_S: Final = 15.0


async def probe_adapter(
    duration_s: float = ADAPTER_PROBE_S, backends: BleBackends | None = None
) -> AdapterStatus:
    """Find out whether Bluetooth is usable by starting a short scan (the only check that works
    the same on BlueZ, CoreBluetooth and WinRT). Errors that are not about the adapter
    propagate."""
    try:
        async with asyncio.timeout(duration_s + ADAPTER_ANSWER_S):
            await scan(duration_s, backends)
    except TimeoutError:
        return AdapterStatus(
            AdapterState.NO_STACK,
            f"no Bluetooth: the Bluetooth stack did not answer within {ADAPTER_ANSWER_S:g} s; "
            "Linux: `systemctl restart bluetooth`; elsewhere turn Bluetooth off and on",
        )
    except Exception as exc:
        state = adapter_state(exc)
        if state is None:
            raise
        return AdapterStatus(state, explain_adapter_error(exc))
    return AdapterStatus(AdapterState.READY)


def adapter_state(exc: BaseException) -> AdapterState | None:
    """The adapter state an error from starting a scan means, or None when it is another
    kind of error."""
    from bleak.exc import (
        BleakBluetoothNotAvailableError,
        BleakBluetoothNotAvailableReason,
        BleakDBusError,
    )

    if isinstance(exc, FileNotFoundError):
        return AdapterState.NO_STACK
    if isinstance(exc, BleakDBusError):
        if "AccessDenied" in exc.dbus_error:
            return AdapterState.NO_PERMISSION
        if "org.bluez" in str(exc):
            return AdapterState.NO_STACK
        return None
    if isinstance(exc, BleakBluetoothNotAvailableError):
        reason = exc.reason
        if reason is BleakBluetoothNotAvailableReason.POWERED_OFF:
            return AdapterState.OFF
        if reason in (
            BleakBluetoothNotAvailableReason.DENIED_BY_USER,
            BleakBluetoothNotAvailableReason.DENIED_BY_SYSTEM,
            BleakBluetoothNotAvailableReason.DENIED_BY_UNKNOWN,
        ):
            return AdapterState.NO_PERMISSION
        if reason is BleakBluetoothNotAvailableReason.UNKNOWN:
            return AdapterState.OFF  # CoreBluetooth's "resetting"/"unknown": usually off
        return AdapterState.ABSENT
    return None


def explain_adapter_error(exc: BaseException) -> str | None:
    """One line saying which part of the Bluetooth stack is missing and how to fix it, or None
    when the error is not about a missing/off adapter."""
    from bleak.exc import BleakDBusError

    state = adapter_state(exc)
    if state is None:
        return None
    if isinstance(exc, FileNotFoundError):
        # bleak's BlueZ backend connects to the system D-Bus socket first.
        return (
            "no Bluetooth: the system D-Bus is not running (no /run/dbus/system_bus_socket); "
            "Linux: install and start dbus and bluez (`systemctl start dbus bluetooth`); "
            "in a container, mount /run/dbus from the host"
        )
    if state is AdapterState.NO_STACK:
        return (
            "no Bluetooth: the BlueZ daemon is not running (org.bluez was not provided); "
            "Linux: install bluez and run `systemctl enable --now bluetooth`"
        )
    if state is AdapterState.NO_PERMISSION:
        if isinstance(exc, BleakDBusError):
            return (
                f"no Bluetooth: this user may not use BlueZ ({exc.dbus_error}); Linux: add the "
                "user to the `bluetooth` group (or allow it in the D-Bus/polkit policy) and log in "
                "again"
            )
        return (
            f"no Bluetooth: permission denied ({exc}); macOS: allow the terminal in System "
            "Settings > Privacy & Security > Bluetooth; Linux: add the user to the `bluetooth` "
            "group; Windows: allow apps to use Bluetooth in Settings > Privacy"
        )
    if state is AdapterState.ABSENT:
        return (
            f"no Bluetooth adapter found ({exc}); plug in a Bluetooth 4.0+ (LE) adapter, or on "
            "Linux check `bluetoothctl list` and that the adapter is not used by another host "
            "(a VM or container)"
        )
    return (
        f"Bluetooth is off ({exc}); Linux: `rfkill unblock bluetooth` and `bluetoothctl power "
        "on`; macOS: turn Bluetooth on in Control Centre; Windows: turn Bluetooth on in Settings"
    )

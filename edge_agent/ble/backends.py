"""The one seam between the bridge and bleak: which bleak backend classes to use."""

from __future__ import annotations

from dataclasses import dataclass

from bleak.backends.client import BaseBleakClient
from bleak.backends.scanner import BaseBleakScanner


@dataclass(frozen=True, slots=True)
class BleBackends:
    """bleak backend classes; None selects the platform's own (BlueZ, CoreBluetooth, WinRT).

    The bridge passes these to `BleakScanner(backend=...)` and, through
    `establish_connection(..., backend=...)`, to `BleakClient`; nothing else differs between
    real hardware and the emulated sensors.
    """

    client: type[BaseBleakClient] | None = None
    scanner: type[BaseBleakScanner] | None = None

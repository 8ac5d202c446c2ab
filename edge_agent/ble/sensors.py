"""The sensors chosen for this bridge, remembered in the agent's state directory."""

from __future__ import annotations

import builtins
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

SENSORS_FILE: Final = "ble_sensors.json"
# A MAC address (Linux, Windows) or a CoreBluetooth peripheral UUID (macOS).
_ADDRESS: Final = re.compile(
    r"^([0-9A-F]{2}:){5}[0-9A-F]{2}$|^[0-9A-F]{8}-([0-9A-F]{4}-){3}[0-9A-F]{12}$"
)


@dataclass(frozen=True, slots=True)
class ChosenSensor:
    """A sensor the bridge keeps connected."""

    address: str
    name: str = ""


def normalize_address(address: str) -> str:
    """Upper-case and validate a MAC address or macOS UUID (ValueError saying what is wrong)."""
    value = address.strip().upper()
    if not _ADDRESS.match(value):
        raise ValueError(
            f"{address!r} is not a Bluetooth address (AA:BB:CC:DD:EE:FF) or a macOS device "
            "UUID; copy it from `pulsesync-agent scan`"
        )
    return value


class SensorStore:
    """Reads and atomically rewrites `<state dir>/ble_sensors.json`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / SENSORS_FILE

    def list(self) -> builtins.list[ChosenSensor]:
        """The chosen sensors, in the order they were added."""
        if not self.path.exists():
            return []
        data = json.loads(self.path.read_text())
        return [ChosenSensor(**item) for item in data.get("sensors", [])]

    def add(self, address: str, name: str = "") -> ChosenSensor:
        """Remember a sensor (re-adding updates its name)."""
        sensor = ChosenSensor(normalize_address(address), name)
        sensors = [s for s in self.list() if s.address != sensor.address] + [sensor]
        self._write(sensors)
        return sensor

    def remove(self, address: str) -> bool:
        """Forget a sensor; False when it was not chosen."""
        target = normalize_address(address)
        sensors = self.list()
        kept = [s for s in sensors if s.address != target]
        self._write(kept)
        return len(kept) != len(sensors)

    def _write(self, sensors: builtins.list[ChosenSensor]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ble_sensors.")
        with os.fdopen(fd, "w") as f:
            json.dump({"sensors": [asdict(s) for s in sensors]}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

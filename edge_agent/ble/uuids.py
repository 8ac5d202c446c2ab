"""Bluetooth SIG assigned numbers for the services and characteristics the bridge reads."""

from __future__ import annotations

from typing import Final


def sig_uuid(short: int) -> str:
    """The 128-bit UUID string (bleak's normalised form) of a 16-bit SIG assigned number."""
    return f"0000{short:04x}-0000-1000-8000-00805f9b34fb"


# Services (Assigned Numbers, section 3.4).
HEART_RATE_SERVICE: Final = sig_uuid(0x180D)
BATTERY_SERVICE: Final = sig_uuid(0x180F)
DEVICE_INFORMATION_SERVICE: Final = sig_uuid(0x180A)
RUNNING_SPEED_AND_CADENCE_SERVICE: Final = sig_uuid(0x1814)
CYCLING_SPEED_AND_CADENCE_SERVICE: Final = sig_uuid(0x1816)
PULSE_OXIMETER_SERVICE: Final = sig_uuid(0x1822)

# Characteristics (Assigned Numbers, section 3.8).
HEART_RATE_MEASUREMENT: Final = sig_uuid(0x2A37)
BODY_SENSOR_LOCATION: Final = sig_uuid(0x2A38)
BATTERY_LEVEL: Final = sig_uuid(0x2A19)
RSC_MEASUREMENT: Final = sig_uuid(0x2A53)
CSC_MEASUREMENT: Final = sig_uuid(0x2A5B)
PLX_SPOT_CHECK_MEASUREMENT: Final = sig_uuid(0x2A5E)
PLX_CONTINUOUS_MEASUREMENT: Final = sig_uuid(0x2A5F)
MANUFACTURER_NAME: Final = sig_uuid(0x2A29)
MODEL_NUMBER: Final = sig_uuid(0x2A24)
SERIAL_NUMBER: Final = sig_uuid(0x2A25)
HARDWARE_REVISION: Final = sig_uuid(0x2A27)
FIRMWARE_REVISION: Final = sig_uuid(0x2A26)
SOFTWARE_REVISION: Final = sig_uuid(0x2A28)

# The services whose advertisement makes a device a candidate sensor for the bridge.
SUPPORTED_SERVICES: Final[dict[str, str]] = {
    HEART_RATE_SERVICE: "heart_rate",
    RUNNING_SPEED_AND_CADENCE_SERVICE: "running_speed_cadence",
    CYCLING_SPEED_AND_CADENCE_SERVICE: "cycling_speed_cadence",
    PULSE_OXIMETER_SERVICE: "pulse_oximeter",
}

# Device Information string characteristics, by the field name they fill.
DEVICE_INFORMATION_STRINGS: Final[dict[str, str]] = {
    "manufacturer": MANUFACTURER_NAME,
    "model": MODEL_NUMBER,
    "serial_number": SERIAL_NUMBER,
    "hardware_revision": HARDWARE_REVISION,
    "firmware_revision": FIRMWARE_REVISION,
    "software_revision": SOFTWARE_REVISION,
}


def short_name(uuid: str) -> str:
    """A readable name for a supported service UUID, else the UUID itself."""
    return SUPPORTED_SERVICES.get(uuid.lower(), uuid.lower())

"""`pulsesync-agent scan` without a Bluetooth stack: one line saying what to fix, exit 2."""

from __future__ import annotations

import argparse

import pytest
from bleak.exc import (
    BleakBluetoothNotAvailableError,
    BleakBluetoothNotAvailableReason,
    BleakDBusError,
)

from pulsesync.edge_agent.ble import cli, scanner


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (FileNotFoundError(2, "No such file or directory"), "D-Bus is not running"),
        (
            BleakDBusError(
                "org.freedesktop.DBus.Error.ServiceUnknown",
                ["The name org.bluez was not provided by any .service files"],
            ),
            "BlueZ daemon is not running",
        ),
        (
            BleakBluetoothNotAvailableError(
                "adapter off", BleakBluetoothNotAvailableReason.POWERED_OFF
            ),
            "Bluetooth is off",
        ),
    ],
)
async def test_scan_without_bluetooth_explains_in_one_line_and_exits_non_zero(
    exc: BaseException,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def no_bluetooth(*args: object, **kwargs: object) -> list[scanner.FoundSensor]:
        raise exc

    monkeypatch.setattr(scanner, "scan", no_bluetooth)
    code = await cli.cmd_scan(argparse.Namespace(duration=0.1, emulated=False))
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert expected in err
    assert "Traceback" not in err


def test_other_errors_are_not_mistaken_for_a_missing_adapter() -> None:
    assert scanner.explain_adapter_error(ValueError("x")) is None

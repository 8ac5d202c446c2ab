"""`pulsesync-agent scan` without a Bluetooth stack: one line saying what to fix, exit 2."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest
from bleak.exc import (
    BleakBluetoothNotAvailableError,
    BleakBluetoothNotAvailableReason,
    BleakDBusError,
)

from pulsesync.edge_agent.ble import cli, scanner
from pulsesync.edge_agent.consent import StaticConsent
from pulsesync.edge_agent.errors import AgentError
from pulsesync.edge_agent.outbox import Outbox
from pulsesync.edge_agent.sources import wearable
from pulsesync.edge_agent.sources.base import SourceOptions
from pulsesync.edge_agent.tracker import Tracker


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


async def test_run_wearable_without_bluetooth_stops_with_the_explanation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`run --source wearable` with no adapter ends with what to fix (the CLI exits 1 on an
    AgentError), instead of retrying forever having recorded nothing."""

    async def no_dbus(*args: object, **kwargs: object) -> list[scanner.FoundSensor]:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(scanner, "scan", no_dbus)
    source = wearable.create_real(SourceOptions(extra={"addresses": "AA:BB:CC:DD:EE:FF"}))
    async with (
        await Outbox.open(tmp_path / "o.db") as outbox,
        Tracker(outbox, StaticConsent()) as t,
    ):
        with pytest.raises(AgentError, match="D-Bus is not running"):
            await asyncio.wait_for(source.run(t), timeout=60)

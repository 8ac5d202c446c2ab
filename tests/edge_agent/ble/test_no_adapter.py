"""Without usable Bluetooth: `scan` says in one line what to fix (exit 2), `run --source
wearable` stops with it, and `status` shows the adapter's state for a wearable setup."""

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

from pulsesync.edge_agent import cli as agent_cli
from pulsesync.edge_agent.ble import cli, scanner
from pulsesync.edge_agent.ble.bumble_backend import VirtualAir
from pulsesync.edge_agent.ble.sensors import SensorStore
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


@pytest.mark.parametrize(
    ("exc", "state"),
    [
        (FileNotFoundError(2, "No such file or directory"), scanner.AdapterState.NO_STACK),
        (
            BleakDBusError(
                "org.freedesktop.DBus.Error.ServiceUnknown",
                ["The name org.bluez was not provided by any .service files"],
            ),
            scanner.AdapterState.NO_STACK,
        ),
        (
            BleakDBusError("org.freedesktop.DBus.Error.AccessDenied", ["Rejected send message"]),
            scanner.AdapterState.NO_PERMISSION,
        ),
        (
            BleakBluetoothNotAvailableError(
                "No powered Bluetooth adapters found.",
                BleakBluetoothNotAvailableReason.POWERED_OFF,
            ),
            scanner.AdapterState.OFF,
        ),
        (
            BleakBluetoothNotAvailableError(
                "No Bluetooth adapters found.", BleakBluetoothNotAvailableReason.NO_BLUETOOTH
            ),
            scanner.AdapterState.ABSENT,
        ),
        (
            BleakBluetoothNotAvailableError(
                "Bluetooth access denied", BleakBluetoothNotAvailableReason.DENIED_BY_USER
            ),
            scanner.AdapterState.NO_PERMISSION,
        ),
    ],
)
async def test_status_shows_the_adapter_state_for_a_wearable_setup(
    exc: BaseException,
    state: scanner.AdapterState,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def failing_scan(*args: object, **kwargs: object) -> list[scanner.FoundSensor]:
        raise exc

    monkeypatch.setattr(scanner, "scan", failing_scan)
    SensorStore(tmp_path).add("aa:bb:cc:dd:ee:01")
    assert await agent_cli.cmd_status(argparse.Namespace(state_dir=tmp_path)) == 0
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if line.startswith("bluetooth:")]
    assert line.split(":", 1)[1].strip().startswith(f"{state.value}: ")
    assert "sensors:       AA:BB:CC:DD:EE:01" in out
    assert "Traceback" not in out


async def test_status_says_ready_when_the_adapter_scans() -> None:
    air = VirtualAir()
    await air.power_on()
    status = await scanner.probe_adapter(0.05, air.backends())
    assert status.state is scanner.AdapterState.READY
    assert status.line().startswith("ready")


async def test_status_without_chosen_sensors_does_not_touch_bluetooth(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def no_scan(*args: object, **kwargs: object) -> list[scanner.FoundSensor]:
        raise AssertionError("status scanned without a wearable setup")

    monkeypatch.setattr(scanner, "scan", no_scan)
    assert await agent_cli.cmd_status(argparse.Namespace(state_dir=tmp_path)) == 0
    assert "bluetooth:" not in capsys.readouterr().out


async def test_a_stack_that_does_not_answer_is_reported_not_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def hanging_scan(*args: object, **kwargs: object) -> list[scanner.FoundSensor]:
        await asyncio.Event().wait()
        return []

    monkeypatch.setattr(scanner, "scan", hanging_scan)
    monkeypatch.setattr(scanner, "ADAPTER_ANSWER_S", 0.05)
    status = await asyncio.wait_for(scanner.probe_adapter(0.01), timeout=60)
    assert status.state is scanner.AdapterState.NO_STACK
    assert status.problem is not None
    assert "did not answer" in status.problem

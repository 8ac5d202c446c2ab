"""The `emulated-wearable` source and the BLE CLI commands."""

from __future__ import annotations

import time

import pytest

from pulsesync.edge_agent.ble.sensors import SensorStore
from pulsesync.edge_agent.cli import build_parser, main
from pulsesync.edge_agent.clock import ScaledClock
from pulsesync.edge_agent.sources import create_source
from pulsesync.edge_agent.sources.base import SourceOptions
from tests.support.bumble_backend import ListSink


async def test_emulated_wearable_streams_strap_and_footpod_through_the_bridge():
    speed, duration = 20.0, 40.0
    start = time.time_ns() // 1000 - int(duration * 1e6)
    clock = ScaledClock(speed, start)
    source = create_source(
        "emulated-wearable", SourceOptions(seed=4, clock=clock, duration_s=duration)
    )
    sink = ListSink()
    await source.run(sink)  # type: ignore[arg-type]
    end = clock.now_us()
    strap, pod = source.emulated  # type: ignore[attr-defined]
    assert strap.produced == pod.produced == duration
    # Measurements made before the bridge subscribed reach nobody, as with a real sensor (how
    # many depends on how fast this machine connects); every one delivered is recorded.
    hr, cadence = sink.of("heart_rate"), sink.of("cadence")
    assert 0 < len(hr) == len(strap.delivered)
    assert 0 < len(cadence) == len(pod.delivered)
    # about one beat per emulated second; a second without a completed beat sends no RR
    beats = sum(len(h.rr_intervals_ms) for h in hr)
    assert len(hr) * 0.8 <= beats <= len(hr) * 3
    times = [e.device_time.ToMicroseconds() for e in sink.events]
    assert times == sorted(times)
    assert start <= times[0] <= times[-1] <= end


def test_emulated_wearable_rejects_unknown_sensor_names():
    with pytest.raises(ValueError, match="strap and/or footpod"):
        create_source("emulated-wearable", SourceOptions(extra={"sensors": "watch"}))


def test_sensors_commands_remember_chosen_sensors(tmp_path, capsys):
    assert (
        main(
            ["--state-dir", str(tmp_path), "sensors", "add", "d1:5e:a5:00:00:01", "--name", "strap"]
        )
        == 0
    )
    assert (
        main(
            ["--state-dir", str(tmp_path), "sensors", "add", "0E1D2C3B-4A59-6877-8695-A4B3C2D1E0F0"]
        )
        == 0
    )
    assert [s.address for s in SensorStore(tmp_path).list()] == [
        "D1:5E:A5:00:00:01",
        "0E1D2C3B-4A59-6877-8695-A4B3C2D1E0F0",
    ]
    assert main(["--state-dir", str(tmp_path), "sensors", "remove", "D1:5E:A5:00:00:01"]) == 0
    assert main(["--state-dir", str(tmp_path), "sensors", "remove", "D1:5E:A5:00:00:01"]) == 1
    assert main(["--state-dir", str(tmp_path), "sensors", "list"]) == 0
    assert "0E1D2C3B" in capsys.readouterr().out
    with pytest.raises(ValueError, match="not a Bluetooth address"):
        SensorStore(tmp_path).add("nonsense")


def test_scan_command_lists_the_emulated_sensors(tmp_path, capsys):
    assert main(["--state-dir", str(tmp_path), "scan", "--emulated", "--duration", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "PulseStrap" in out
    assert "running_speed_cadence" in out


def test_run_accepts_the_emulated_wearable_source():
    args = build_parser().parse_args(["run", "--source", "emulated-wearable"])
    assert args.source == "emulated-wearable"

"""What the bridge forwards: a field the sensor did not measure (or sent as garbage) is absent
from the event, not 0, and the rest of the measurement is kept; a spot-check-only oximeter
streams; a battery that cannot notify is re-read."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

from pulsesync.edge_agent.ble.bridge import Bridge, BridgeConfig, ErrorClass
from pulsesync.edge_agent.ble.emulation import CyclingSensor, EmulatedSensor, SpotCheckOximeter
from pulsesync.edge_agent.ble.parsers import SFLOAT_NAN, SFLOAT_POSITIVE_INFINITY
from pulsesync.edge_agent.retry import RetryPolicy
from tests.support.bumble_backend import ListSink, emulated_world, wait_until

FAST = {c: RetryPolicy(0.01, 0.05) for c in ErrorClass}


def config(**kw: float) -> BridgeConfig:
    return BridgeConfig(scan_timeout_s=1.0, backoff=FAST, seed=3, **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def bridged(sensor: EmulatedSensor, sink: ListSink, **kw: float) -> AsyncIterator[Bridge]:
    """Start `sensor` on its air and a bridge to it; stop both afterwards."""
    await sensor.start()
    bridge = Bridge(sink, [sensor.address], config=config(**kw), backends=sensor.air.backends())
    task = asyncio.create_task(bridge.run())
    try:
        async with asyncio.timeout(30):
            await bridge.wait_connected()
        yield bridge
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.timeout(30):
                await task
        await sensor.close()


def _hr(flags: int, bpm: int, rr_1024: list[int]) -> bytes:
    bpm_bytes = struct.pack("<H", bpm) if flags & 0x01 else bytes([bpm])
    return bytes([flags]) + bpm_bytes + b"".join(struct.pack("<H", r) for r in rr_1024)


async def test_a_bpm_the_strap_did_not_measure_is_absent_and_its_rr_intervals_are_kept():
    async with emulated_world() as w:
        sink = ListSink()
        async with bridged(w.strap, sink) as bridge:
            # no skin contact: bpm 0, but the strap still reports two beats
            assert await w.strap.send_raw(_hr(0x14, 0, [700, 720]))
            assert await w.strap.send_raw(_hr(0x04, 0, []))  # nothing measured: no event
            assert await w.strap.send_raw(_hr(0x00, 75, []))
            await wait_until(lambda: len(sink.of("heart_rate")) == 2, within_s=20)
            assert bridge.stats[0].dropped_values == {"heart_rate.bpm": 2}
        first, second = sink.of("heart_rate")
        assert not first.HasField("bpm")
        assert [round(r) for r in first.rr_intervals_ms] == [684, 703]
        assert second.HasField("bpm")
        assert second.bpm == 75


async def test_values_dropped_are_counted_per_field():
    async with emulated_world() as w:
        sink = ListSink()
        async with bridged(w.strap, sink) as bridge:
            assert await w.strap.send_raw(_hr(0x14, 0, [700]))
            assert await w.strap.send_raw(_hr(0x01, 0xFFFF, []))
            assert await w.strap.send_raw(_hr(0x10, 80, [0]))
            await wait_until(lambda: len(sink.of("heart_rate")) == 2, within_s=20)
            assert bridge.stats[0].dropped_values == {
                "heart_rate.bpm": 2,
                "heart_rate.rr_intervals_ms": 1,
            }
        only_rr, only_bpm = sink.of("heart_rate")
        assert not only_rr.HasField("bpm")
        assert len(only_rr.rr_intervals_ms) == 1
        assert only_bpm.bpm == 80
        assert list(only_bpm.rr_intervals_ms) == []


async def test_a_footpod_speed_out_of_range_is_absent_and_its_cadence_kept():
    async with emulated_world() as w:
        sink = ListSink()
        async with bridged(w.pod, sink) as bridge:
            # RSC: speed 0xFFFF/256 = 256 m/s (garbage), cadence 170/min
            assert await w.pod.send_raw(struct.pack("<BHB", 0x04, 0xFFFF, 170))
            # standing still: speed 0 is a measurement, present and 0
            assert await w.pod.send_raw(struct.pack("<BHB", 0x00, 0, 0))
            await wait_until(lambda: len(sink.of("cadence")) == 2, within_s=20)
            assert bridge.stats[0].dropped_values == {"cadence.speed_m_per_s": 1}
        running, still = sink.of("cadence")
        assert not running.HasField("speed_m_per_s")
        assert running.cadence_per_min == 170.0
        assert still.HasField("speed_m_per_s")
        assert still.speed_m_per_s == 0.0
        assert still.HasField("cadence_per_min")


async def test_a_crank_only_sensor_sends_cadence_without_a_speed():
    async with emulated_world() as w:
        crank = CyclingSensor(w.air, wheel=False, crank=True)
        sink = ListSink()
        async with bridged(crank, sink):
            for _ in range(3):
                assert await crank.pedal(1.0, crank_revs=1)
            await wait_until(lambda: len(sink.of("cadence")) == 2, within_s=20)
        for c in sink.of("cadence"):
            assert not c.HasField("speed_m_per_s")
            assert round(c.cadence_per_min) == 60


async def test_a_wheel_only_sensor_sends_speed_without_a_cadence():
    async with emulated_world() as w:
        wheel = CyclingSensor(w.air, wheel=True, crank=False)
        sink = ListSink()
        async with bridged(wheel, sink):
            for _ in range(3):
                assert await wheel.pedal(1.0, wheel_revs=4)
            await wait_until(lambda: len(sink.of("cadence")) == 2, within_s=20)
        for c in sink.of("cadence"):
            assert not c.HasField("cadence_per_min")
            assert round(c.speed_m_per_s, 2) == 8.42


async def test_a_spot_check_only_oximeter_streams_and_an_unreported_pulse_rate_is_absent():
    async with emulated_world() as w:
        ox = SpotCheckOximeter(w.air)
        sink = ListSink()
        async with bridged(ox, sink) as bridge:
            assert await ox.measure(97.0, 64.0)
            assert await ox.measure(96.0, float("nan"))  # pulse rate "not available"
            # a pulse rate of +inf is garbage: dropped and counted, the SpO2 kept
            assert await ox.send_raw(struct.pack("<BHH", 0, 0xF000 | 955, SFLOAT_POSITIVE_INFINITY))
            # SpO2 "not available": no reading at all, not an error
            assert await ox.send_raw(struct.pack("<BHH", 0, SFLOAT_NAN, 0x0000 | 70))
            assert await ox.measure(98.0, 66.0)
            await wait_until(lambda: len(sink.of("oxygen_saturation")) == 4, within_s=20)
            stats = bridge.stats[0]
            assert stats.services == ("pulse_oximeter",)
            assert stats.dropped_values == {"oxygen_saturation.pulse_rate_bpm": 1}
            assert stats.parse_errors == 0
        readings = sink.of("oxygen_saturation")
        assert [round(r.spo2_percent, 1) for r in readings] == [97.0, 96.0, 95.5, 98.0]
        assert [r.pulse_rate_bpm if r.HasField("pulse_rate_bpm") else None for r in readings] == [
            64.0,
            None,
            None,
            66.0,
        ]


async def test_a_battery_that_does_not_notify_is_re_read_during_the_session():
    async with emulated_world() as w:
        ox = SpotCheckOximeter(w.air)
        sink = ListSink()
        async with bridged(ox, sink, battery_reread_s=0.05) as bridge:
            await wait_until(lambda: len(sink.of("battery")) == 1, within_s=20)
            ox.battery = 80
            await wait_until(lambda: len(sink.of("battery")) == 2, within_s=20)
            ox.battery = 79
            await wait_until(lambda: len(sink.of("battery")) == 3, within_s=20)
            assert bridge.stats[0].sessions == 1  # re-read on the same link, not by reconnecting
        # only changes become events, however often the level is read
        assert [b.level_percent for b in sink.of("battery")] == [100, 80, 79]

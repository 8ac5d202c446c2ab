"""The bridge under sensor faults: failing optional reads, a BLE stack that swallows a cancel,
values the server would quarantine, and addresses spelled in different case."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from typing import Any

from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.exc import BleakError

from pulsesync.edge_agent.ble import uuids
from pulsesync.edge_agent.ble.backends import BleBackends
from pulsesync.edge_agent.ble.bridge import Bridge, BridgeConfig, ErrorClass
from pulsesync.edge_agent.ble.bumble_backend import BumbleBleakClient
from pulsesync.edge_agent.retry import RetryPolicy
from pulsesync.edge_agent.sink import EventSink
from tests.support.bumble_backend import ListSink, emulated_world, wait_until

FAST = {c: RetryPolicy(0.01, 0.05) for c in ErrorClass}


def config() -> BridgeConfig:
    return BridgeConfig(scan_timeout_s=1.0, backoff=FAST, seed=3)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        async with asyncio.timeout(30):
            await task


async def test_failing_optional_reads_are_skipped_and_counted_and_the_sensor_streams():
    class OddReads(BumbleBleakClient):
        async def read_gatt_char(
            self, characteristic: BleakGATTCharacteristic, **kwargs: Any
        ) -> bytearray:
            if characteristic.uuid == uuids.BATTERY_LEVEL:
                return bytearray([101])  # above 100 %: GattParseError
            if characteristic.uuid in uuids.DEVICE_INFORMATION_STRINGS.values():
                raise BleakError("ATT error: Insufficient Authentication (0x05)")
            return await super().read_gatt_char(characteristic, **kwargs)

    async with emulated_world() as w:
        OddReads.air = w.air
        sink = ListSink()
        bridge = Bridge(
            sink,
            [w.strap.address],
            config=config(),
            backends=BleBackends(client=OddReads, scanner=w.backends.scanner),
        )
        task = asyncio.create_task(bridge.run())
        try:
            async with asyncio.timeout(20):
                await bridge.wait_connected()
            await w.strap.tick()
            await wait_until(lambda: len(sink.of("heart_rate")) == 1, within_s=20)
        finally:
            await _stop(task)
        stats = bridge.stats[0]
        assert stats.reconnects == []  # setup did not fail
        assert stats.skipped_reads["battery_level"] == 1
        assert stats.skipped_reads["manufacturer"] == 1
        assert stats.location is not None  # the reads that work are still made


async def test_cancel_always_ends_the_bridge_even_when_the_stack_swallows_it():
    # A sensor stuck failing setup, and a disconnect that eats CancelledError (as a BLE stack
    # waiting on a D-Bus reply may): cancelling at any point must still end run().
    class StuckSetup(BumbleBleakClient):
        async def start_notify(self, *args: Any, **kwargs: Any) -> None:
            raise BleakError("ATT error: Unlikely Error (0x0e)")

        async def disconnect(self) -> None:
            try:
                await super().disconnect()
                in_disconnect.set()
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                pass  # swallowed

    in_disconnect = asyncio.Event()
    for steps in range(0, 220, 9):
        # a fresh virtual air each time: a cancel may land anywhere in the emulated stack too
        async with emulated_world() as w:
            StuckSetup.air = w.air
            backends = BleBackends(client=StuckSetup, scanner=w.backends.scanner)
            bridge = Bridge(EventSinkList(), [w.strap.address], config=config(), backends=backends)
            task = asyncio.create_task(bridge.run())
            for _ in range(steps):
                await asyncio.sleep(0)
            if steps % 2:
                # cancel while the stack is inside disconnect (where the cancel was lost)
                in_disconnect.clear()
                async with asyncio.timeout(30):
                    await in_disconnect.wait()
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=30)
            assert done, (steps, task.get_stack())
            with contextlib.suppress(asyncio.CancelledError):
                await task


class EventSinkList(ListSink):
    """A ListSink (the name says it is only here to satisfy the EventSink protocol)."""


def _hr_payload(flags: int, bpm: int, rr_1024: list[int]) -> bytes:
    bpm_bytes = struct.pack("<H", bpm) if flags & 0x01 else bytes([bpm])
    return bytes([flags]) + bpm_bytes + b"".join(struct.pack("<H", r) for r in rr_1024)


async def test_values_the_server_would_quarantine_are_dropped_and_counted():
    async with emulated_world() as w:
        sink = ListSink()
        bridge = Bridge(sink, [w.strap.address], config=config(), backends=w.backends)
        task = asyncio.create_task(bridge.run())
        try:
            async with asyncio.timeout(20):
                await bridge.wait_connected()
            # RR 0 beside a valid bpm: the RR is dropped, the bpm and the other RR kept
            assert await w.strap.send_raw(_hr_payload(0x10, 72, [0, 615]))
            # bpm 0 with sensor contact supported but not detected
            assert await w.strap.send_raw(_hr_payload(0x04, 0, []))
            # bpm 65535 (uint16 format)
            assert await w.strap.send_raw(_hr_payload(0x01, 0xFFFF, []))
            assert await w.strap.send_raw(_hr_payload(0x00, 80, []))
            await wait_until(lambda: len(sink.of("heart_rate")) == 2, within_s=20)
        finally:
            await _stop(task)
        first, second = sink.of("heart_rate")
        assert first.bpm == 72
        assert [round(r, 1) for r in first.rr_intervals_ms] == [600.6]
        assert second.bpm == 80
        assert bridge.stats[0].dropped_values == {
            "heart_rate.rr_intervals_ms": 1,
            "heart_rate.bpm": 2,
        }


def test_one_sensor_is_one_link_whatever_the_case_of_its_address():
    sink: EventSink = ListSink()
    bridge = Bridge(sink, ["aa:bb:cc:dd:ee:01", "AA:BB:CC:DD:EE:01", " Aa:bB:cc:dd:ee:01"])
    assert [link.address for link in bridge.links] == ["AA:BB:CC:DD:EE:01"]


async def test_cancel_ends_the_bridge_at_any_point_while_a_sensor_is_out_of_range():
    # The link alternates between waiting for an advertisement that does not come and its
    # NOT_FOUND delay (also spent listening); a cancel anywhere in that cycle ends run().
    for steps in range(0, 200, 11):
        async with emulated_world() as w:
            await w.strap.leave()
            bridge = Bridge(
                EventSinkList(),
                [w.strap.address],
                config=BridgeConfig(scan_timeout_s=0.02, backoff=FAST, seed=steps),
                backends=w.backends,
            )
            task = asyncio.create_task(bridge.run())
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=30)
            assert done, (steps, task.get_stack())
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert task.cancelled()

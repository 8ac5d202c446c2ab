"""The demo's clock stands still while held, never goes back, and sleepers wait holds out."""

from __future__ import annotations

import asyncio

from pulsesync.server.demo.world import PacedClock

START_US = 1_700_000_000_000_000
SPEED = 1000.0


async def test_a_hold_stops_the_clock_for_its_length_and_time_never_goes_back() -> None:
    clock = PacedClock(SPEED, START_US)
    clock.hold(600.0)  # far longer than this test runs, on any machine
    at = clock.now_us()
    await asyncio.sleep(0.02)
    clock.hold(1.0)  # added to the hold in progress
    assert clock.now_us() == at
    readings = [clock.now_us()]
    other = PacedClock(SPEED, START_US)
    for _ in range(50):
        other.hold(0.001)
        readings.append(other.now_us())
        await asyncio.sleep(0.001)
    assert readings[1:] == sorted(readings[1:])


async def test_a_sleeper_wakes_only_once_the_clock_reached_its_time() -> None:
    clock = PacedClock(SPEED, START_US)
    target = clock.now_us() + 5_000_000  # 5 simulated seconds: 5 ms of real time unheld
    clock.hold(0.3)
    sleeper = asyncio.create_task(clock.sleep_until(target))
    await asyncio.sleep(0.05)
    if clock.now_us() < target:  # the hold holds (a stalled machine may have outlived it)
        assert not sleeper.done()
    async with asyncio.timeout(60):  # only bounds a hang
        await sleeper
    assert clock.now_us() >= target

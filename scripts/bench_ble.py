#!/usr/bin/env python3
"""BLE bridge throughput and notification-to-server delay, over emulated sensors (bumble).

    python scripts/bench_ble.py            # default run (about half a minute)
    python scripts/bench_ble.py --quick    # a smaller run

One invocation measures, in one process on the same machine:
1. parsers: Heart Rate and RSC payloads decoded per second (no I/O at all);
2. link: notifications per second the emulated link delivers from --sensors emulated
   sensors to a plain bumble GATT client on the central (no bleak, no bridge): the ceiling
   the virtual radio sets;
3. bridge: notifications per second the production bridge sustains from the same sensors
   (bleak backend -> parse -> event -> Tracker -> durable outbox), with the ratio to 2;
4. delay: a real server and the agent's uplink with default batching; sensors notify at
   --rate Hz each and every event's delay from notification (host clock, stamped by the
   bridge) to committed on the server is recorded: p50 / p99 (goal p99 < 1 s).
Ends with one JSON line of the headline figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bumble.device import Peer  # noqa: E402

from pulsesync.edge_agent.agent import Agent  # noqa: E402
from pulsesync.edge_agent.ble.bridge import Bridge, BridgeConfig  # noqa: E402
from pulsesync.edge_agent.ble.bumble_backend import VirtualAir  # noqa: E402
from pulsesync.edge_agent.ble.emulation import EmulatedSensor, Footpod, HeartRateStrap  # noqa: E402
from pulsesync.edge_agent.ble.parsers import HeartRateMeasurement, RscMeasurement  # noqa: E402
from pulsesync.edge_agent.client import Credentials  # noqa: E402
from pulsesync.edge_agent.consent import StaticConsent  # noqa: E402
from pulsesync.v1 import common_pb2, events_pb2  # noqa: E402
from tests.support.server import pair_device, start_server  # noqa: E402


def _sensors(air: VirtualAir, n: int) -> list[EmulatedSensor]:
    out: list[EmulatedSensor] = []
    for i in range(n):
        address = f"D1:5E:A5:00:01:{i:02X}"
        cls = HeartRateStrap if i % 2 == 0 else Footpod
        out.append(cls(air, address, name=f"bench-{i}", seed=i))
    return out


async def _pump(sensors: list[EmulatedSensor], seconds: float) -> None:
    """Every sensor notifies as fast as the loop lets it for `seconds`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def one(s: EmulatedSensor) -> None:
        while loop.time() < end:
            await s.tick()
            await asyncio.sleep(0)

    await asyncio.gather(*(one(s) for s in sensors))


def bench_parsers(seconds: float) -> float:
    hr = bytes(HeartRateMeasurement(72, rr_intervals=(800, 812)))
    rsc = bytes(RscMeasurement(896, 170, 123, 8000, True))
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(1000):
            HeartRateMeasurement.from_bytes(hr)
            RscMeasurement.from_bytes(rsc)
        n += 2000
    return n / seconds


async def bench_link(n_sensors: int, seconds: float) -> float:
    air = VirtualAir()
    await air.power_on()
    sensors = _sensors(air, n_sensors)
    received = 0

    def count(_value: bytes) -> None:
        nonlocal received
        received += 1

    for s in sensors:
        await s.start()
        connection = await air.central.connect(s.address)
        peer = Peer(connection)
        await peer.discover_all()  # type: ignore[no-untyped-call]
        [char] = [
            c
            for svc in peer.services
            for c in svc.characteristics
            if c.handle == s.measurement_char.handle
        ]
        await peer.subscribe(char, count)
    t0 = time.perf_counter()
    await _pump(sensors, seconds)
    await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - t0
    for s in sensors:
        await s.close()
    return received / elapsed


async def bench_bridge(n_sensors: int, seconds: float, tmp: Path) -> tuple[float, int]:
    air = VirtualAir()
    await air.power_on()
    sensors = _sensors(air, n_sensors)
    for s in sensors:
        await s.start()
    async with Agent(
        tmp / "bench-outbox.db", consent=StaticConsent()
    ) as agent:  # collect only: no uplink
        bridge = Bridge(
            agent.tracker,
            [s.address for s in sensors],
            config=BridgeConfig(scan_timeout_s=2),
            backends=air.backends(),
        )
        task = asyncio.create_task(bridge.run())
        async with asyncio.timeout(20):
            await bridge.wait_connected()
        written0 = agent.tracker.stats().written
        t0 = time.perf_counter()
        await _pump(sensors, seconds)
        await agent.tracker.flush()
        elapsed = time.perf_counter() - t0
        written = agent.tracker.stats().written - written0
        errors = sum(st.parse_errors for st in bridge.stats)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for s in sensors:
        await s.close()
    return written / elapsed, errors


async def bench_delay(n_sensors: int, rate_hz: float, seconds: float, tmp: Path) -> list[float]:
    delays_ms: list[float] = []
    async with start_server(tmp / "server") as server:
        device = await pair_device(server, "bench", kind=common_pb2.DEVICE_KIND_WEARABLE_BRIDGE)

        def committed(_user: int, events: Any) -> None:
            now_us = time.time_ns() // 1000
            for e in events:
                ev = events_pb2.Event.FromString(e.body)
                if ev.WhichOneof("payload") in ("heart_rate", "cadence"):
                    delays_ms.append((now_us - ev.device_time.ToMicroseconds()) / 1000)

        server.app.bus.subscribe(committed)
        air = VirtualAir()
        await air.power_on()
        sensors = _sensors(air, n_sensors)
        for s in sensors:
            await s.start()
        creds = Credentials(
            server=server.address,
            device_id=device.device_id,
            token=device.token,
            kind=common_pb2.DEVICE_KIND_WEARABLE_BRIDGE,
        )
        async with Agent(tmp / "delay-outbox.db", creds, consent=StaticConsent()) as agent:
            bridge = Bridge(
                agent.tracker,
                [s.address for s in sensors],
                config=BridgeConfig(scan_timeout_s=2),
                backends=air.backends(),
            )
            task = asyncio.create_task(bridge.run())
            async with asyncio.timeout(20):
                await bridge.wait_connected()
            await asyncio.gather(*(s.run(rate_hz, int(rate_hz * seconds)) for s in sensors))
            await agent.drain(10)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for s in sensors:
            await s.close()
    return delays_ms


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sensors", type=int, default=4, help="emulated sensors (half straps)")
    ap.add_argument("--seconds", type=float, default=None, help="throughput phase length")
    ap.add_argument("--rate", type=float, default=4.0, help="Hz per sensor in the delay phase")
    ap.add_argument("--delay-seconds", type=float, default=None)
    args = ap.parse_args()
    seconds = args.seconds or (2.0 if args.quick else 6.0)
    delay_seconds = args.delay_seconds or (5.0 if args.quick else 15.0)

    parsers = bench_parsers(1.0 if args.quick else 2.0)
    print(f"parsers alone:            {parsers:12,.0f} payloads/s")
    link = await bench_link(args.sensors, seconds)
    print(f"emulated link (raw GATT): {link:12,.0f} notifications/s from {args.sensors} sensors")
    with tempfile.TemporaryDirectory() as d:
        bridge, errors = await bench_bridge(args.sensors, seconds, Path(d))
        print(
            f"bridge -> outbox:         {bridge:12,.0f} notifications/s "
            f"({bridge / link:.2f}x the raw link; {errors} parse errors)"
        )
        delays = await bench_delay(args.sensors, args.rate, delay_seconds, Path(d))
    p50, p99 = _pct(delays, 0.50), _pct(delays, 0.99)
    print(
        f"notification -> stored:   p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {max(delays):.0f} ms "
        f"over {len(delays)} events ({args.sensors} sensors at {args.rate:g} Hz, default batching;"
        f" mean {statistics.fmean(delays):.0f} ms)"
    )
    print(
        json.dumps(
            {
                "parser_payloads_per_s": round(parsers),
                "link_notifications_per_s": round(link),
                "bridge_notifications_per_s": round(bridge),
                "bridge_vs_link": round(bridge / link, 3),
                "sensors": args.sensors,
                "delay_p50_ms": round(p50, 1),
                "delay_p99_ms": round(p99, 1),
                "delay_events": len(delays),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())

"""`pulsesync-agent scan` and `pulsesync-agent sensors add|remove|list` (BLE bridge commands).

pulsesync-agent scan [--duration S] [--emulated]
pulsesync-agent sensors add ADDRESS [--name NAME]
pulsesync-agent sensors remove ADDRESS
pulsesync-agent sensors list
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pulsesync.argtypes import positive
from pulsesync.edge_agent.ble.sensors import SensorStore


async def cmd_scan(args: argparse.Namespace) -> int:
    """List sensors advertising a supported service: address, RSSI, name, services."""
    from pulsesync.edge_agent.ble.scanner import scan

    if args.emulated:
        from pulsesync.edge_agent.ble.bumble_backend import VirtualAir
        from pulsesync.edge_agent.ble.emulation import Footpod, HeartRateStrap

        air = VirtualAir()
        await air.power_on()
        sensors = [HeartRateStrap(air), Footpod(air)]
        for s in sensors:
            await s.start()
        try:
            found = await scan(args.duration, air.backends())
        finally:
            for s in sensors:
                await s.close()
    else:
        from pulsesync.edge_agent.ble.scanner import explain_adapter_error

        try:
            found = await scan(args.duration)
        except Exception as exc:
            problem = explain_adapter_error(exc)
            if problem is None:
                raise
            print(problem, file=sys.stderr)
            return 2
    if not found:
        print(
            "no supported sensors found: wear the strap (it sleeps without skin contact), "
            "move the footpod, check Bluetooth is on and permitted (see docs/ble.md)"
        )
        return 1
    for sensor in found:
        print(sensor.line())
    print("next: pulsesync-agent sensors add ADDRESS")
    return 0


async def cmd_sensors(args: argparse.Namespace) -> int:
    """Add, remove or list the sensors this bridge keeps connected."""
    store = SensorStore(args.state_dir)
    if args.action == "add":
        sensor = store.add(args.address, args.name)
        print(f"added {sensor.address}; `pulsesync-agent run --source wearable` connects to it")
    elif args.action == "remove":
        if not store.remove(args.address):
            print(f"{args.address} was not a chosen sensor")
            return 1
        print(f"removed {args.address}")
    else:
        chosen = store.list()
        for s in chosen:
            print(f"{s.address}  {s.name}")
        if not chosen:
            print("no sensors chosen: `pulsesync-agent scan`, then `sensors add ADDRESS`")
    return 0


def register(sub: Any) -> None:
    """Add the BLE commands to the `pulsesync-agent` subparsers."""
    p = sub.add_parser("scan", help="list nearby BLE sensors with supported services")
    p.add_argument("--duration", type=positive, default=5.0, help="seconds to scan (default 5)")
    p.add_argument(
        "--emulated", action="store_true", help="scan the emulated strap and footpod instead"
    )
    p.set_defaults(handler=cmd_scan)

    p = sub.add_parser("sensors", help="choose the BLE sensors this bridge keeps connected")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("add", help="remember a sensor by address (from `scan`)")
    a.add_argument("address")
    a.add_argument("--name", default="")
    r = actions.add_parser("remove", help="forget a sensor")
    r.add_argument("address")
    actions.add_parser("list", help="show the chosen sensors")
    p.set_defaults(handler=cmd_sensors)

"""Test support for the BLE bridge: emulated sensors on a bumble virtual link, reached through
the bumble-backed bleak backend, an in-memory EventSink, and failure-injecting backends.

The backend classes themselves live in `pulsesync.edge_agent.ble.bumble_backend` because the
`emulated-wearable` source uses them outside tests too; here they are bound to a fresh
`VirtualAir` per test and subclassed for fault injection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from bleak.backends.client import BaseBleakClient
from google.protobuf import timestamp_pb2

from pulsesync.edge_agent.ble.backends import BleBackends
from pulsesync.edge_agent.ble.bumble_backend import BumbleBleakClient, VirtualAir
from pulsesync.edge_agent.ble.emulation import Footpod, HeartRateStrap
from pulsesync.v1 import events_pb2


class ListSink:
    """An EventSink that keeps events in memory, filling id, seq and time like the Tracker."""

    def __init__(self) -> None:
        self.events: list[events_pb2.Event] = []

    def record(self, event: events_pb2.Event) -> None:
        if not event.event_id:
            event.event_id = str(uuid.uuid4())
        if not event.seq:
            event.seq = len(self.events) + 1
        if not event.HasField("device_time"):
            event.device_time.CopyFrom(timestamp_pb2.Timestamp(seconds=int(time.time())))
        self.events.append(event)

    def of(self, kind: str, sensor: str | None = None) -> list[Any]:
        """Payloads of one kind (e.g. "heart_rate"), optionally from one sensor."""
        out = []
        for e in self.events:
            if e.WhichOneof("payload") == kind:
                payload = getattr(e, kind)
                if sensor is None or payload.sensor_id == sensor:
                    out.append(payload)
        return out


@dataclass
class World:
    """A virtual air with a strap and a footpod advertising on it."""

    air: VirtualAir
    strap: HeartRateStrap
    pod: Footpod
    backends: BleBackends
    extra: list[Any] = field(default_factory=list)


@contextlib.asynccontextmanager
async def emulated_world(seed: int = 7) -> AsyncIterator[World]:
    """Start the central and both sensors; power everything off afterwards."""
    air = VirtualAir()
    strap = HeartRateStrap(air, seed=seed)
    pod = Footpod(air, seed=seed)
    await air.power_on()
    await strap.start()
    await pod.start()
    try:
        yield World(air, strap, pod, air.backends())
    finally:
        await strap.close()
        await pod.close()


def failing_client_backend(air: VirtualAir, failures: list[BaseException]) -> type[BaseBleakClient]:
    """A client backend whose next `connect()` calls raise the given errors, in order, before
    behaving normally (a subclass of the real backend: everything else is the real path)."""
    pending = list(failures)

    class FailingClient(BumbleBleakClient):
        async def connect(self, pair: bool, **kwargs: Any) -> None:
            if pending:
                raise pending.pop(0)
            await super().connect(pair, **kwargs)

    FailingClient.air = air
    return FailingClient


async def wait_until(predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    """Poll a condition every few ms (notifications cross several loop hops), failing after
    within_s seconds."""
    async with asyncio.timeout(within_s):
        while not predicate():  # noqa: ASYNC110 - the condition is external state, no event
            await asyncio.sleep(0.005)

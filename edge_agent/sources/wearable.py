"""BLE wearable sources for `pulsesync-agent run`.

`emulated-wearable`: a heart-rate strap and a running footpod emulated with bumble on a
virtual link, read by the production bridge through the bumble-backed bleak backend.
`wearable`: the same bridge on the platform's Bluetooth adapter, for the sensors chosen with
`pulsesync-agent sensors add`.

Source options (`--source-option KEY=VALUE`): `sensors=strap,footpod` (emulated: which ones),
`drop_every_s=N` (emulated: drop each link every N real seconds, to watch reconnects),
`addresses=A,B` and `state_dir=DIR` (real: which sensors; default the chosen ones).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Final

from pulsesync.edge_agent.ble.bridge import Bridge, BridgeConfig
from pulsesync.edge_agent.ble.sensors import SensorStore
from pulsesync.edge_agent.config import default_state_dir
from pulsesync.edge_agent.errors import AgentError
from pulsesync.edge_agent.sources.base import SourceOptions, check_extra, extra_number
from pulsesync.edge_agent.tracker import Tracker
from pulsesync.timeutil import US_PER_S

if TYPE_CHECKING:
    from pulsesync.edge_agent.ble.emulation import EmulatedSensor


# Longest wait at the end of a run for notifications still crossing the virtual link.
SETTLE_S: Final = 5.0


class EmulatedWearable:
    """Runs emulated sensors and the bridge; each sensor notifies once per emulated second."""

    def __init__(self, options: SourceOptions) -> None:
        self.options = options
        check_extra(options, "emulated-wearable", ("sensors", "drop_every_s"))
        wanted = options.extra.get("sensors", "strap,footpod").split(",")
        self.sensors = {s.strip() for s in wanted if s.strip()}
        unknown = self.sensors - {"strap", "footpod"}
        if unknown or not self.sensors:
            raise ValueError(f"sensors= takes strap and/or footpod, not {sorted(unknown)}")
        self.drop_every_s = extra_number(options, "drop_every_s", 0.0)
        self.bridge: Bridge | None = None
        # The sensors of the last run (their delivery logs say what the bridge was sent).
        self.emulated: list[EmulatedSensor] = []

    async def run(self, tracker: Tracker) -> None:
        """Stream until the duration is over (or until cancelled)."""
        # Imported here: bumble loads only when this source is chosen.
        from pulsesync.edge_agent.ble.bumble_backend import VirtualAir
        from pulsesync.edge_agent.ble.emulation import Footpod, HeartRateStrap

        clock = self.options.clock
        air = VirtualAir()
        await air.power_on()
        sensors: list[EmulatedSensor] = []
        if "strap" in self.sensors:
            sensors.append(HeartRateStrap(air, seed=self.options.seed))
        if "footpod" in self.sensors:
            sensors.append(Footpod(air, seed=self.options.seed))
        self.emulated = sensors
        for s in sensors:
            await s.start()
        self.bridge = Bridge(
            tracker,
            [s.address for s in sensors],
            config=BridgeConfig(scan_timeout_s=2.0),
            backends=air.backends(),
            clock_us=clock.now_us,
        )
        start_us = clock.now_us()
        try:
            async with asyncio.TaskGroup() as tg:
                bridge_task = tg.create_task(self.bridge.run())
                ticking = [tg.create_task(self._tick(s, start_us)) for s in sensors]
                if self.drop_every_s > 0:
                    ticking.append(tg.create_task(self._drops(sensors)))
                await asyncio.gather(*ticking[: len(sensors)])
                await self._received(sensors)
                for t in (bridge_task, *ticking):
                    t.cancel()
        finally:
            for s in sensors:
                await s.close()

    async def _received(self, sensors: list[EmulatedSensor]) -> None:
        """Wait (briefly) until the bridge has handled every measurement the sensors delivered:
        the last ones are still crossing the virtual link when the sensors stop."""
        assert self.bridge is not None
        links = {link.address: link for link in self.bridge.links}

        def behind() -> bool:
            return any(links[s.address].stats.notifications < len(s.delivered) for s in sensors)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE_S):
                while behind():  # noqa: ASYNC110 - counters, no event to wait on
                    await asyncio.sleep(0.01)

    async def _tick(self, sensor: EmulatedSensor, start_us: int) -> None:
        n = 0
        duration = self.options.duration_s
        while duration is None or n < duration:
            n += 1
            await self.options.clock.sleep_until(start_us + n * US_PER_S)
            await sensor.tick()

    async def _drops(self, sensors: list[EmulatedSensor]) -> None:
        while True:
            await asyncio.sleep(self.drop_every_s)
            for s in sensors:
                await s.drop_link()


class RealWearable:
    """The bridge on the platform adapter, for the chosen (or given) sensor addresses."""

    def __init__(self, options: SourceOptions) -> None:
        self.options = options
        check_extra(options, "wearable", ("addresses", "state_dir"))
        if addresses := options.extra.get("addresses"):
            self.addresses = [a.strip() for a in addresses.split(",") if a.strip()]
        else:
            state_dir = Path(options.extra.get("state_dir") or default_state_dir())
            self.addresses = [s.address for s in SensorStore(state_dir).list()]

    async def run(self, tracker: Tracker) -> None:
        """Keep the sensors connected until the duration is over or cancelled."""
        await _require_adapter()
        bridge = Bridge(tracker, self.addresses, clock_us=self.options.clock.now_us)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.options.duration_s):
                await bridge.run()


async def _require_adapter() -> None:
    """Raise AgentError, saying what to fix, when there is no usable Bluetooth adapter: without
    one the bridge would retry forever and record nothing."""
    from pulsesync.edge_agent.ble import scanner

    status = await scanner.probe_adapter()
    if status.state is not scanner.AdapterState.READY:
        raise AgentError(status.problem or status.line())


def create(options: SourceOptions) -> EmulatedWearable:
    """Factory for `emulated-wearable`."""
    return EmulatedWearable(options)


def create_real(options: SourceOptions) -> RealWearable:
    """Factory for `wearable` (real sensors)."""
    return RealWearable(options)

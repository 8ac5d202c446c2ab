"""The demo world: a real server on loopback and, per person, a phone, a desktop and a
wearable bridge, all talking to it through the public API, in accelerated time.

Only the very first step uses the admin path (what `pulsesync users add` and `pulsesync
devices pair-code` do): everything after it goes through gRPC and the agent SDKs, exactly as
an app would use them.

The world is told in three parts, each a module: setup.py's pairing and agents (`SetUp`),
day.py's simulated day (`Day`) and collect.py's reads, export and erasure at its end
(`Collection`); model.py holds what they fill in, base.py what they share and clock.py the
paced clock the whole world runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pulsesync.server.app import running_server
from pulsesync.server.config import ServerConfig
from pulsesync.server.demo.clock import PACE_SLACK_S, PACE_TICK_S, PacedClock
from pulsesync.server.demo.collect import Collection
from pulsesync.server.demo.day import Day
from pulsesync.server.demo.model import (
    NAMES,
    DemoOptions,
    DemoResult,
    Happening,
    PersonRun,
    Say,
)
from pulsesync.server.demo.persona import Persona
from pulsesync.server.demo.setup import SetUp
from pulsesync.timeutil import US_PER_HOUR, US_PER_S

__all__ = ["DemoOptions", "DemoResult", "DemoWorld", "PacedClock", "PersonRun"]


def _period(options: DemoOptions) -> tuple[int, int]:
    """A past period (the clock may not run ahead of the host's): the most recent day whose
    `start_hour` plus `hours` ended at least an hour ago."""
    now = datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    start = day + timedelta(hours=options.start_hour)
    while start + timedelta(hours=options.hours) > now - timedelta(hours=1):
        start -= timedelta(days=1)
    start_us = int(start.timestamp() * US_PER_S)
    return start_us, start_us + int(options.hours * US_PER_HOUR)


class DemoWorld(SetUp, Day, Collection):
    """Builds and runs the world; `say` receives happenings as they happen."""

    def __init__(self, options: DemoOptions, say: Say | None = None) -> None:
        self.options = options
        self.start_us, self.end_us = _period(options)
        speed = options.hours * 3600 / options.wall_seconds
        self.clock = PacedClock(speed, self.start_us)
        self.rng = random.Random(options.seed)
        self.happenings: list[Happening] = []
        self._say = say
        self.people: list[PersonRun] = []
        self.address = ""
        self.progress: Callable[[int], None] = lambda _t: None

    # -- the run -------------------------------------------------------------------------------
    async def _pace(self) -> None:
        """Hold the clock for as long as the event loop runs late (see PacedClock)."""
        while True:
            before = time.monotonic()
            await asyncio.sleep(PACE_TICK_S)
            late = time.monotonic() - before - PACE_TICK_S
            if late > PACE_SLACK_S:
                self.clock.hold(late)

    async def run(self) -> DemoResult:
        began = time.monotonic()
        pacer = asyncio.create_task(self._pace(), name="demo-pacer")
        try:
            return await self._run(began)
        finally:
            pacer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pacer

    async def _run(self, began: float) -> DemoResult:
        with tempfile.TemporaryDirectory(prefix="pulsesync-demo-") as tmp:
            root = Path(tmp)
            config = ServerConfig(
                port=0,
                data_dir=root / "server",
                grace_seconds=1.0,
                nudges=self._nudge_config(),
            )
            async with (
                running_server(config, clock=self.clock) as server,
                AsyncExitStack() as stack,
            ):
                self.address = server.address
                for i in range(self.options.users):
                    persona = Persona(NAMES[i], self._day_start(), seed=self.options.seed + i)
                    person = PersonRun(persona)
                    self.people.append(person)
                    await self._set_up(person, root / persona.name, config, stack)
                async with asyncio.TaskGroup() as tg:
                    for person in self.people:
                        person.tasks = [tg.create_task(c) for c in self._background(person)]
                    await self._play()
                    for person in self.people:
                        await self._finish(person)
        return DemoResult(
            self.options,
            self.start_us,
            self.end_us,
            self.people,
            self.happenings,
            time.monotonic() - began,
        )

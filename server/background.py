"""Background work with an explicit start and stop, run by the server between opening storage
and closing it (see `pulsesync.server.compose.Components.background`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Background:
    """One component's background work: started in list order, stopped in reverse."""

    name: str
    start: Callable[[], Awaitable[None]]
    stop: Callable[[], Awaitable[None]]


class Periodic:
    """Runs fn now and then every `seconds`, logging (not dying on) failures."""

    def __init__(self, name: str, seconds: float, fn: Callable[[], Awaitable[object]]) -> None:
        self.name = name
        self.seconds = seconds
        self._fn = fn
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            try:
                await self._fn()
            except Exception:
                log.exception("%s failed; retrying on the next tick", self.name)
            await asyncio.sleep(self.seconds)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def background(self) -> Background:
        return Background(self.name, self.start, self.stop)

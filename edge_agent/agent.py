"""An edge agent in one object: outbox + tracker + uplink, as an async context manager.

    async with Agent(state_dir / "outbox.db", credentials) as agent:
        agent.tracker.tap("study", "home", "start_button")
        await agent.drain(timeout_s=5)

On exit the tracker is flushed to the outbox (so nothing recorded is lost), the uplink gets
`drain_on_exit_s` to send what it can, then stops; the rest is sent on the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from pulsesync.edge_agent.client import Credentials
from pulsesync.edge_agent.clock import Clock
from pulsesync.edge_agent.config import AgentSettings, StatePaths
from pulsesync.edge_agent.consent import ConsentView
from pulsesync.edge_agent.credentials import rotate_if_due
from pulsesync.edge_agent.outbox import Outbox
from pulsesync.edge_agent.tracker import Tracker
from pulsesync.edge_agent.uplink import Uplink
from pulsesync.v1 import ingest_pb2

log = logging.getLogger(__name__)


class Agent:
    """Wires an Outbox, a Tracker and (with credentials) an Uplink; use `async with`."""

    def __init__(
        self,
        outbox_path: str | Path,
        credentials: Credentials | None = None,
        *,
        consent: ConsentView | None = None,
        settings: AgentSettings | None = None,
        clock: Clock | None = None,
        uplink_clock: Clock | None = None,
        drain_on_exit_s: float = 0.0,
        on_ack: Callable[[ingest_pb2.UploadResponse], None] | None = None,
    ) -> None:
        self.outbox_path = Path(outbox_path)
        self.credentials = credentials
        self.consent = consent
        self.settings = settings or AgentSettings()
        self.clock = clock
        # The device's real clock, which stamps each batch's sent_time (the server corrects
        # skew from it). It differs from `clock` when a simulation backdates events on a real
        # device; a world that simulates the server's time too passes the same clock to both.
        self.uplink_clock = uplink_clock
        self.drain_on_exit_s = drain_on_exit_s
        self._on_ack = on_ack
        self._outbox: Outbox | None = None
        self._tracker: Tracker | None = None
        self._uplink: Uplink | None = None
        self._uplink_task: asyncio.Task[None] | None = None
        # Where the credentials were loaded from: set, the token is rotated when due at start.
        self.credentials_path: Path | None = None

    @classmethod
    def from_state_dir(cls, state_dir: str | Path, **kwargs: object) -> Agent:
        """An agent over a state directory written by `pulsesync-agent pair`."""
        paths = StatePaths(Path(state_dir))
        agent = cls(paths.outbox, Credentials.load(paths.credentials), **kwargs)  # type: ignore[arg-type]
        agent.credentials_path = paths.credentials  # so that start() can rotate the token
        return agent

    # -- parts ------------------------------------------------------------------------------
    @property
    def outbox(self) -> Outbox:
        """The durable outbox (open while the agent runs)."""
        if self._outbox is None:
            raise RuntimeError("the agent is not running: use `async with Agent(...)`")
        return self._outbox

    @property
    def tracker(self) -> Tracker:
        """The Tracker SDK (an EventSink) that apps and bridges record into."""
        if self._tracker is None:
            raise RuntimeError("the agent is not running: use `async with Agent(...)`")
        return self._tracker

    @property
    def uplink(self) -> Uplink | None:
        """The uplink, or None when the agent runs without credentials (collect only)."""
        return self._uplink

    @property
    def uplink_task(self) -> asyncio.Task[None] | None:
        """The task running the uplink: it ends only with PairingRequired or AgentError."""
        return self._uplink_task

    # -- lifetime ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the outbox, start the tracker's flusher and the uplink."""
        self._outbox = await Outbox.open(self.outbox_path)
        s = self.settings
        self._tracker = Tracker(
            self._outbox,
            self.consent,
            clock=self.clock,
            linger_s=s.tracker_linger_s,
            max_batch=s.tracker_max_batch,
            max_queue=s.tracker_max_queue,
        )
        await self._tracker.start()
        if self.credentials is not None and self.credentials_path is not None:
            self.credentials = await rotate_if_due(
                self.credentials, self.credentials_path, now_us=time.time_ns() // 1000
            )
        if self.credentials is not None:
            self._uplink = Uplink(
                self._outbox,
                self.credentials,
                settings=s,
                clock=self.uplink_clock,
                on_ack=self._on_ack,
            )
            self._uplink_task = asyncio.create_task(self._uplink.run(), name="uplink")

    async def stop(self) -> None:
        """Flush the tracker, give the uplink `drain_on_exit_s`, stop it, close the outbox."""
        try:
            if self._tracker is not None:
                await self._tracker.close()
            if self.drain_on_exit_s > 0 and self._uplink_task is not None:
                with contextlib.suppress(Exception):
                    await self.drain(self.drain_on_exit_s)
        finally:
            if self._uplink_task is not None:
                self._uplink_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._uplink_task
            if self._outbox is not None:
                await self._outbox.close()
            self._outbox = self._tracker = self._uplink = self._uplink_task = None

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Flush the tracker and wait until the outbox is empty (every event acknowledged).

        Returns False on timeout; raises the uplink's error if it stopped (e.g. PairingRequired).
        """
        await self.tracker.flush()
        outbox = self.outbox
        changed = asyncio.Event()
        remove = outbox.add_listener(changed.set)
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    changed.clear()
                    if await outbox.count() == 0:
                        return True
                    task = self._uplink_task
                    if task is None:
                        return False  # nothing will send them
                    waiter = asyncio.ensure_future(changed.wait())
                    try:
                        await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()
                    if task.done():
                        task.result()  # raises the uplink's error
                        return False
        except TimeoutError:
            return False
        finally:
            remove()

"""A doorbell between replicas on PostgreSQL's LISTEN/NOTIFY: "something changed, go and read".

A replica that commits a low-rate change another replica must act on (a profile version, a
consent change, a revocation, a nudge for a device) rings a channel in the same transaction
(`ring`), so the ring is delivered only if, and once, the change commits. Every replica keeps
one dedicated listening connection (not a pooled one: a pool would UNLISTEN it on release) and
calls the channel's callbacks with the small payload (an id, never the data: the data is read
from the tables, so a payload never carries personal data and never exceeds NOTIFY's limit).

Rings sent while the listening connection is down are lost, which LISTEN/NOTIFY cannot avoid;
so after every reconnect each callback is called with None, meaning "you may have missed
rings: read again what you watch". A listener that goes silent (a half-open socket) is found
by a periodic round trip and replaced.

Never ring on the ingest commit path: a transaction with a pending NOTIFY takes an
instance-wide lock at commit, which would serialize every replica's ingest commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from typing import Any, Final

import asyncpg

from pulsesync.server.storage.postgres.pool import Connection, server_settings

log = logging.getLogger(__name__)

# Payloads are ids, not data; NOTIFY's own limit is 8000 bytes.
MAX_PAYLOAD_BYTES: Final = 256
_CHANNEL: Final = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
# How often the listener proves it is alive, and how long it may take to answer.
KEEPALIVE_S: Final = 5.0
KEEPALIVE_TIMEOUT_S: Final = 10.0
# Between reconnection attempts: first, and at most (doubling in between).
RECONNECT_MIN_S: Final = 0.1
RECONNECT_MAX_S: Final = 5.0

Callback = Callable[[str | None], None]


def _check(channel: str, payload: str = "") -> None:
    if not _CHANNEL.match(channel):
        raise ValueError(f"bad doorbell channel {channel!r}: lowercase letters, digits, _")
    if len(payload.encode()) > MAX_PAYLOAD_BYTES:
        raise ValueError("a doorbell payload is an id, not data (at most 256 bytes)")


async def ring(conn: Connection | asyncpg.Connection, channel: str, payload: str = "") -> None:
    """Ring `channel` from within the caller's transaction: delivered when (if) it commits."""
    _check(channel, payload)
    await conn.execute("SELECT pg_notify($1, $2)", channel, payload)


class Doorbell:
    """This replica's listening end: channel -> callbacks, on one reconnecting connection."""

    def __init__(self, dsn: str, *, keepalive_s: float = KEEPALIVE_S) -> None:
        self._dsn = dsn
        self._keepalive_s = keepalive_s
        self._callbacks: dict[str, list[Callback]] = {}
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        # One operation at a time on the listening connection (asyncpg refuses a second):
        # a LISTEN from subscribe() and the keepalive round trip must not overlap.
        self._busy = asyncio.Lock()
        self.connects = 0  # successful (re)connections, for tests and metrics

    async def start(self) -> None:
        """Connect and listen; returns once listening (later losses reconnect by themselves)."""
        self._task = asyncio.create_task(self._run(), name="doorbell")
        waiter = asyncio.create_task(self._connected.wait())
        done, _ = await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            waiter.cancel()
            self._task.result()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def backend_pid(self) -> int | None:
        """The listening session's server pid (for tests and diagnostics)."""
        conn = self._conn
        return conn.get_server_pid() if conn is not None and not conn.is_closed() else None

    async def subscribe(self, channel: str, callback: Callback) -> Callable[[], None]:
        """Call `callback(payload)` at every ring of `channel` (None after a reconnect);
        returns the function that unsubscribes it."""
        _check(channel)
        first = channel not in self._callbacks
        self._callbacks.setdefault(channel, []).append(callback)
        conn = self._conn
        if first and conn is not None and not conn.is_closed():
            async with self._busy:
                await conn.add_listener(channel, self._deliver)

        def unsubscribe() -> None:
            callbacks = self._callbacks.get(channel, [])
            with contextlib.suppress(ValueError):
                callbacks.remove(callback)
            # The LISTEN stays until the next reconnect: harmless, and no await needed here.

        return unsubscribe

    def _deliver(self, _conn: Any, _pid: int, channel: str, payload: object) -> None:
        self._call(channel, str(payload))

    def _call(self, channel: str, payload: str | None) -> None:
        for callback in list(self._callbacks.get(channel, [])):
            try:
                callback(payload)
            except Exception:
                log.exception("a doorbell callback failed", extra={"channel": channel})

    async def _run(self) -> None:
        delay = RECONNECT_MIN_S
        while True:
            try:
                await self._listen()
                delay = RECONNECT_MIN_S
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("doorbell connection lost (%s); reconnecting", type(e).__name__)
            finally:
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _listen(self) -> None:
        conn = await asyncpg.connect(self._dsn, server_settings=server_settings())
        self._conn = conn
        self._lost.clear()
        conn.add_termination_listener(lambda _c: self._lost.set())
        async with self._busy:
            for channel in list(self._callbacks):
                await conn.add_listener(channel, self._deliver)
        self.connects += 1
        if self.connects > 1:
            # Rings sent while we were away are gone: every watcher reads again.
            for channel in list(self._callbacks):
                self._call(channel, None)
        self._connected.set()
        while not self._lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), self._keepalive_s)
            if self._lost.is_set() or conn.is_closed():
                break
            async with self._busy:
                await asyncio.wait_for(conn.fetchval("SELECT 1"), KEEPALIVE_TIMEOUT_S)
        raise ConnectionError("the listening connection closed")

"""A loopback TCP forwarder that can make a server unreachable for a while (BLE end-to-end
tests: the bridge keeps collecting into the outbox while the uplink cannot connect)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class TcpProxy:
    """Forwards 127.0.0.1:<port> to an upstream address; `block()` cuts and refuses links."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host or "127.0.0.1", int(port))
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.blocked = False
        self.address = ""
        self.connections = 0  # links forwarded so far

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        self.block()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def block(self) -> None:
        """Refuse new connections and reset the open ones (the server 'goes away')."""
        self.blocked = True
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def unblock(self) -> None:
        """Accept connections again."""
        self.blocked = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, up_writer))
        for task in (
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._answers(up_reader, writer, up_writer)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answers(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: asyncio.StreamWriter
    ) -> None:
        """Forward the server's side to the client (a subclass may interfere here)."""
        await self._pipe(src, dst)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.transport.abort()
            self._writers.discard(dst)


@contextlib.asynccontextmanager
async def tcp_proxy(upstream: str) -> AsyncIterator[TcpProxy]:
    """A started proxy to upstream, closed on exit."""
    proxy = TcpProxy(upstream)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()

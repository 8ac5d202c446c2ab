"""A loopback TCP forwarder that loses a call's answer: the server gets the request and
carries it out, but the connection is cut just before the response reaches the client.

It reads the server-to-client HTTP/2 frames (plaintext h2c, as the test servers speak):
connection-level frames (SETTINGS, PING, WINDOW_UPDATE on stream 0) pass, and while armed the
first frame of a response (HEADERS on a stream) cuts both sides instead of being forwarded.
The server has committed by then: a gRPC unary handler sends its headers with its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from tests.support.tcp_proxy import TcpProxy

_FRAME_HEADER = 9
_HEADERS = 0x1


class LossyProxy(TcpProxy):
    """TcpProxy whose `lose_answers(n)` drops the next n responses by cutting the link."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.to_lose = 0
        self.lost = 0

    def lose_answers(self, n: int = 1) -> None:
        """Cut the connection instead of delivering each of the next n responses."""
        self.to_lose = n

    async def _answers(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        upstream: asyncio.StreamWriter,
    ) -> None:
        """Forward server frames whole; cut both links at an armed response's first frame."""
        try:
            while True:
                header = await src.readexactly(_FRAME_HEADER)
                length = int.from_bytes(header[:3], "big")
                kind = header[3]
                stream = int.from_bytes(header[5:9], "big") & 0x7FFF_FFFF
                payload = await src.readexactly(length)
                if kind == _HEADERS and stream != 0 and self.to_lose > 0:
                    self.to_lose -= 1
                    self.lost += 1
                    upstream.transport.abort()
                    return
                dst.write(header + payload)
                await dst.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            dst.transport.abort()
            self._writers.discard(dst)


@contextlib.asynccontextmanager
async def lossy_proxy(upstream: str) -> AsyncIterator[LossyProxy]:
    """A started lossy proxy to upstream, closed on exit."""
    proxy = LossyProxy(upstream)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()

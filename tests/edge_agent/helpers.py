"""Shared helpers for edge agent tests."""

from __future__ import annotations

import asyncio

from pulsesync.edge_agent.outbox import Outbox
from pulsesync.v1 import events_pb2


def taps(n: int, screen: str = "home") -> list[events_pb2.Event]:
    """n tap events with nothing but the payload set."""
    out = []
    for i in range(n):
        e = events_pb2.Event()
        e.tap.app, e.tap.screen, e.tap.target = "study", screen, f"button_{i}"
        out.append(e)
    return out


async def until_empty(outbox: Outbox, timeout_s: float = 10.0) -> None:
    """Wait (without polling) until the outbox holds no events."""
    changed = asyncio.Event()
    remove = outbox.add_listener(changed.set)
    try:
        async with asyncio.timeout(timeout_s):
            while await outbox.count():
                changed.clear()
                await changed.wait()
    finally:
        remove()

"""A database damaged while the server runs: found at the first statement that meets the damage
(whichever it is), then nothing more is read or written, every call answers UNAVAILABLE /
STORAGE_DAMAGED, health says NOT_SERVING, and one log line says what to do."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pulsesync.server.clock import FakeClock
from pulsesync.server.rpc.base import error_info
from pulsesync.server.storage.db import BUSY_TIMEOUT_MS
from pulsesync.v1 import ingest_pb2, ingest_pb2_grpc, timeline_pb2, timeline_pb2_grpc
from tests.server.timeline.events import batch, heart_rate
from tests.support.server import PairedDevice, pair_device, start_server

DEADLINE_S = 60.0


def _damage(path: Path) -> bytes:
    """Move the WAL into the file, then overwrite every page but the first (the schema) with
    bytes no b-tree page starts with; returns what the file holds after."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
        page = int(conn.execute("PRAGMA page_size").fetchone()[0])
    finally:
        conn.close()
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(page)
        f.write(b"\xff" * (size - page))
    return path.read_bytes()


async def _upload(ch: grpc.aio.Channel, dev: PairedDevice, first: int, now: int) -> Any:
    stub: Any = ingest_pb2_grpc.IngestServiceStub(ch)
    events = [heart_rate(s, now) for s in range(first, first + 100)]
    return await stub.UploadBatch(
        ingest_pb2.UploadBatchRequest(batch=batch(first, now, events)),
        metadata=dev.metadata,
        timeout=60,
    )


async def _list(ch: grpc.aio.Channel, dev: PairedDevice, now: int) -> Any:
    stub: Any = timeline_pb2_grpc.TimelineServiceStub(ch)
    req = timeline_pb2.ListEventsRequest(page_size=50)
    req.start_time.FromMicroseconds(now - 3_600_000_000)
    req.end_time.FromMicroseconds(now + 3_600_000_000)
    return await stub.ListEvents(req, metadata=dev.metadata, timeout=60)


def _assert_damaged(e: grpc.aio.AioRpcError) -> None:
    assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
    info = error_info(e)
    assert info is not None
    assert info.reason == "STORAGE_DAMAGED"
    assert "Error" not in (e.details() or "")  # no Python exception text


async def _health(ch: grpc.aio.Channel, service: str = "") -> int:
    stub: Any = health_pb2_grpc.HealthStub(ch)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
    return int(resp.status)


async def _wait_not_serving(ch: grpc.aio.Channel) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while await _health(ch) != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert loop.time() < deadline, "health never went NOT_SERVING"
        await asyncio.sleep(0.05)
    for service in ("pulsesync.v1.IngestService", "pulsesync.v1.TimelineService"):
        assert await _health(ch, service) == health_pb2.HealthCheckResponse.NOT_SERVING


def _damage_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]


@pytest.mark.parametrize("first_call", ["upload", "list"])
async def test_a_database_damaged_while_serving_is_neither_served_nor_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, first_call: str
) -> None:
    """`upload`: the ingest writer process meets the damage; `list`: a read on the server's
    own connection does."""
    caplog.set_level(logging.WARNING)
    clock = FakeClock()  # still: no token re-check or last_seen write gets in the way
    async with start_server(tmp_path, clock=clock) as server:
        dev = await pair_device(server, "ada")
        now = clock.now_us()
        async with grpc.aio.insecure_channel(server.address) as ch:
            ok = await _upload(ch, dev, 1, now)
            assert ok.ack.acked_through_seq == 100
            assert await _health(ch) == health_pb2.HealthCheckResponse.SERVING
            path = server.app.db.path
            damaged = _damage(path)

            call = _upload(ch, dev, 101, now) if first_call == "upload" else _list(ch, dev, now)
            with pytest.raises(grpc.aio.AioRpcError) as first:
                await call
            _assert_damaged(first.value)
            await _wait_not_serving(ch)
            # Every later call, read or write, gets the same precise answer.
            for call in (_upload(ch, dev, 201, now), _list(ch, dev, now)):
                with pytest.raises(grpc.aio.AioRpcError) as later:
                    await call
                _assert_damaged(later.value)
            # Nothing was acked or written after the damage: the file and its WAL as left.
            assert path.read_bytes() == damaged
            wal = path.with_name(path.name + "-wal")
            assert not wal.exists() or wal.stat().st_size == 0
            lines = _damage_lines(caplog)
            assert len(lines) == 1, lines
            assert ".recover" in lines[0]
            assert str(path) in lines[0]
            assert server.app.db.damage is not None

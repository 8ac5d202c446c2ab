"""A full disk: writes answer RESOURCE_EXHAUSTED (STORAGE_FULL), reads keep working.

SQLite's `max_page_count` on the server's write connection makes the database full the way a
full disk does: SQLite raises the same SQLITE_FULL "database or disk is full".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pulsesync.server.app import RunningServer
from pulsesync.server.clock import FakeClock
from pulsesync.server.rpc.base import error_info
from pulsesync.v1 import devices_pb2, devices_pb2_grpc
from tests.support.server import pair_device, start_server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fake_server(tmp_path: Path, clock: FakeClock) -> AsyncIterator[RunningServer]:
    async with start_server(tmp_path, clock=clock) as running:
        yield running


async def test_writes_are_resource_exhausted_and_reads_work_while_the_disk_is_full(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    dev = await pair_device(fake_server, "ada")
    writer = fake_server.app.db.writer
    async with writer.execute("PRAGMA page_count") as cur:
        row = await cur.fetchone()
    assert row is not None
    await writer.execute(f"PRAGMA max_page_count = {int(row[0])}")  # no page may be added
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        stub: Any = devices_pb2_grpc.DeviceServiceStub(ch)
        # Each code is a new row: the free room left in the table's pages runs out soon.
        err: grpc.aio.AioRpcError | None = None
        for _ in range(5000):
            try:
                await stub.CreatePairingCode(
                    devices_pb2.CreatePairingCodeRequest(), metadata=dev.metadata, timeout=10
                )
            except grpc.aio.AioRpcError as e:
                err = e
                break
        assert err is not None, "the database never filled up"
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        info = error_info(err)
        assert info is not None
        assert info.reason == "STORAGE_FULL"
        # Reads go on, including the first call after last_seen is due to be written again.
        for _ in range(3):
            clock.advance(3600)
            resp = await stub.ListDevices(
                devices_pb2.ListDevicesRequest(), metadata=dev.metadata, timeout=10
            )
            assert [d.device_id for d in resp.devices] == [dev.device_id]

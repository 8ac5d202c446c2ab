"""A full disk: writes answer RESOURCE_EXHAUSTED (STORAGE_FULL), reads keep working, and
upload batches are not acked until space returns, when the same writer stores them.

SQLite's `max_page_count` makes the database full the way a full disk does: SQLite raises the
same SQLITE_FULL "database or disk is full". On the server's own write connection the test sets
it directly; the ingest writer process gets it from tests/support/capped_sqlite.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pulsesync.server.app import RunningServer
from pulsesync.server.clock import FakeClock
from pulsesync.server.rpc.base import error_info
from pulsesync.server.storage.db import BUSY_TIMEOUT_MS, migrate
from pulsesync.v1 import devices_pb2, devices_pb2_grpc, ingest_pb2, ingest_pb2_grpc
from tests.server.timeline.events import batch, heart_rate
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


# The ballast is what the test frees to give space back: rows of about one page each.
BALLAST_ROWS = 60
FREED_ROWS = 40  # freed before the server starts: room for a few batches of events
BATCH = 500
CAPPED = Path(__file__).resolve().parents[2] / "support" / "capped_sqlite"


def _with_ballast(path: Path) -> None:
    migrate(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("CREATE TABLE ballast (b BLOB)")
        conn.executemany("INSERT INTO ballast VALUES (zeroblob(15000))", [()] * BALLAST_ROWS)
        conn.execute("DELETE FROM ballast WHERE rowid <= ?", (FREED_ROWS,))
    finally:
        conn.close()


async def _count(server: RunningServer, where: str, *args: int) -> int:
    async with server.app.db.reader.execute(
        f"SELECT count(*) FROM events WHERE {where}", args
    ) as cur:
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_the_ingest_writer_refuses_a_batch_on_a_full_disk_and_recovers_when_space_returns(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    _with_ballast(tmp_path / "pulsesync.db")
    # Only the writer process, started with the server, runs with its database capped.
    monkeypatch.setenv("PULSESYNC_TEST_CAP_DB_GROWTH", "1")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(CAPPED), os.environ.get("PYTHONPATH")]))
    )
    async with start_server(tmp_path, clock=clock) as server:
        writer = server.servicers["pulsesync.v1.IngestService"].pipeline.writer
        pid = writer.pid
        dev = await pair_device(server, "ada")
        now = clock.now_us()
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub: Any = ingest_pb2_grpc.IngestServiceStub(ch)

            async def send(first: int) -> ingest_pb2.UploadResponse:
                events = [heart_rate(s, now) for s in range(first, first + BATCH)]
                resp = await stub.UploadBatch(
                    ingest_pb2.UploadBatchRequest(batch=batch(first, now, events)),
                    metadata=dev.metadata,
                    timeout=60,
                )
                assert not resp.ack.HasField("error"), resp.ack.error
                return resp.ack  # type: ignore[no-any-return]

            first = 1
            full: grpc.aio.AioRpcError | None = None
            for _ in range(200):
                try:
                    ack = await send(first)
                except grpc.aio.AioRpcError as e:
                    full = e
                    break
                assert ack.acked_through_seq == first + BATCH - 1
                first += BATCH
            assert full is not None, "the capped database never filled up"
            assert first > 1, "some batches fit before the disk was full"
            assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, full.details()
            info = error_info(full)
            assert info is not None
            assert info.reason == "STORAGE_FULL"
            acked = first - 1
            # Everything acked is stored; nothing of the refused batch is, nor acked.
            assert await _count(server, "seq <= ?", acked) == acked
            assert await _count(server, "seq > ?", acked) == 0
            state = await stub.GetUploadState(
                ingest_pb2.GetUploadStateRequest(), metadata=dev.metadata, timeout=30
            )
            assert state.acked_through_seq == acked
            # Still full: refused again, the same way.
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await send(first)
            assert again.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            # The operator frees space: the same writer process stores the batch now.
            conn = sqlite3.connect(tmp_path / "pulsesync.db", isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                conn.execute("DELETE FROM ballast")
            finally:
                conn.close()
            ack = await send(first)
            assert ack.acked_through_seq == first + BATCH - 1
            ack = await send(first + BATCH)
            assert ack.acked_through_seq == first + 2 * BATCH - 1
            assert await _count(server, "seq > 0") == first + 2 * BATCH - 1
            assert writer.pid == pid, "the writer recovered without a restart"

"""GetUploadState: a restored app learns the server's watermark for its device."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from pulsesync.server.app import RunningServer
from pulsesync.server.clock import FakeClock
from pulsesync.v1 import ingest_pb2, ingest_pb2_grpc
from tests.server.timeline.events import batch, heart_rate
from tests.support.postgres import postgres_database, postgres_dsn
from tests.support.server import pair_device, server_database, start_server

__all__ = ["postgres_database", "postgres_dsn", "server_database"]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fake_server(tmp_path: Path, clock: FakeClock):  # type: ignore[no-untyped-def]
    async with start_server(tmp_path, clock=clock) as running:
        yield running


async def test_upload_state_reports_the_acked_mark_and_last_commit_per_device(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    phone = await pair_device(fake_server, "ada")
    watch = await pair_device(fake_server, "ada")
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        stub = ingest_pb2_grpc.IngestServiceStub(ch)
        empty = await stub.GetUploadState(
            ingest_pb2.GetUploadStateRequest(), metadata=phone.metadata, timeout=10
        )
        assert empty.acked_through_seq == 0
        assert not empty.HasField("last_commit_time")

        now = clock.now_us()
        first = await stub.UploadBatch(
            ingest_pb2.UploadBatchRequest(
                batch=batch(1, now, [heart_rate(seq, now) for seq in (1, 2, 3)])
            ),
            metadata=phone.metadata,
            timeout=10,
        )
        clock.advance(5)
        later = clock.now_us()
        second = await stub.UploadBatch(
            ingest_pb2.UploadBatchRequest(batch=batch(2, later, [heart_rate(4, later)])),
            metadata=phone.metadata,
            timeout=10,
        )
        state = await stub.GetUploadState(
            ingest_pb2.GetUploadStateRequest(), metadata=phone.metadata, timeout=10
        )
        other = await stub.GetUploadState(
            ingest_pb2.GetUploadStateRequest(), metadata=watch.metadata, timeout=10
        )
    assert (first.ack.acked_through_seq, second.ack.acked_through_seq) == (3, 4)
    # the mark the acks reported, and the receive time of the latest commit
    assert state.acked_through_seq == second.ack.acked_through_seq
    assert state.last_commit_time.ToMicroseconds() == later
    # each device has its own watermark
    assert other.acked_through_seq == 0
    assert not other.HasField("last_commit_time")


async def test_upload_state_needs_a_device_token(fake_server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        stub = ingest_pb2_grpc.IngestServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetUploadState(ingest_pb2.GetUploadStateRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

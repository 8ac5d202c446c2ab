"""PairDevice guesses are rate limited per peer and overall, and cost no database write."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pulsesync.server.app import RunningServer
from pulsesync.server.clock import FakeClock
from pulsesync.server.identity import PAIR_FAILURES_PER_PEER, PAIR_PEER_REFILL_S
from pulsesync.server.rpc.base import error_info
from pulsesync.server.storage.db import Database
from pulsesync.v1 import common_pb2, devices_pb2, devices_pb2_grpc
from tests.support.server import start_server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fake_time_server(tmp_path: Path, clock: FakeClock) -> AsyncIterator[RunningServer]:
    async with start_server(tmp_path, clock=clock) as running:
        yield running


def _request(code: str) -> devices_pb2.PairDeviceRequest:
    return devices_pb2.PairDeviceRequest(
        pairing_code=code, device_name="guess", kind=common_pb2.DEVICE_KIND_PHONE
    )


def _retry_delay_s(err: grpc.aio.AioRpcError) -> float | None:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToMicroseconds()) / 1e6
    return None


async def test_guessing_is_limited_with_a_retry_delay_and_no_writes(
    fake_time_server: RunningServer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = fake_time_server
    user_id = await server.app.identity.add_user("ada")
    code, _ = await server.app.identity.create_pairing_code(user_id)
    db = server.app.db
    async with grpc.aio.insecure_channel(server.address) as ch:
        stub = devices_pb2_grpc.DeviceServiceStub(ch)
        # a failed guess must not open a write transaction: the store gets a database whose
        # transaction() fails the test
        ids = server.app.identity
        monkeypatch.setattr(ids._storage, "_db", _ReadOnly(db))
        for _ in range(PAIR_FAILURES_PER_PEER):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.PairDevice(_request("AAAA-AAAA"), timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            info = error_info(e.value)
            assert info is not None
            assert info.reason == "PAIRING_CODE_UNKNOWN_OR_EXPIRED"
        monkeypatch.setattr(ids._storage, "_db", db)

        # the next try, even with the right code, is refused until the delay has passed
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.PairDevice(_request(code), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(e.value)
        assert info is not None
        assert info.reason == "PAIRING_RATE_LIMITED"
        delay = _retry_delay_s(e.value)
        assert delay is not None
        assert 0 < delay <= PAIR_PEER_REFILL_S

        clock.advance(delay)
        resp = await stub.PairDevice(_request(code), timeout=10)
        assert resp.token


async def test_a_malformed_code_has_its_own_reason(server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as ch:
        stub = devices_pb2_grpc.DeviceServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.PairDevice(_request("ABC"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(e.value)
    assert info is not None
    assert info.reason == "PAIRING_CODE_MALFORMED"


class _ReadOnly:
    """A database whose reads work and whose write transactions fail the test."""

    def __init__(self, db: Database) -> None:
        self.reader = db.reader

    def transaction(self) -> object:
        raise AssertionError("a failed pairing guess opened a write transaction")

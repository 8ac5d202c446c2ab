"""Retries of one call (AIP-155 request_id) that reach two replicas at once take effect once.

Both replicas are real gRPC servers storing everything in one PostgreSQL database (each with
its own pool and cluster); the retry window's claims are rows of that database, so neither
replica's in-process lock is what serializes them here.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from pulsesync.server.app import RunningServer, running_server
from pulsesync.server.config import ServerConfig
from pulsesync.server.postgres_cluster import PostgresCluster
from pulsesync.server.storage.database_url import parse_database
from pulsesync.server.storage.idempotency import Claim, IdempotencyStorage
from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.status import error_info
from pulsesync.v1 import devices_pb2, devices_pb2_grpc
from tests.support.postgres import until
from tests.support.server import pair_device

WITHIN_S = 30.0  # generous: this machine is shared and slow


@dataclass
class Replica:
    server: RunningServer
    channel: grpc.aio.Channel

    @property
    def devices(self) -> Any:
        return devices_pb2_grpc.DeviceServiceStub(self.channel)


@pytest.fixture
async def pg_replicas(tmp_path: Path, postgres_dsn: str) -> AsyncIterator[tuple[Replica, Replica]]:
    # One data directory: the replicas share the key file and the key vault file.
    config = ServerConfig(
        port=0, data_dir=tmp_path, database_url=parse_database(postgres_dsn), grace_seconds=0.5
    )
    pools: list[PostgresPool] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            out = []
            for name in ("a", "b"):
                pool = await PostgresPool.open(postgres_dsn, max_size=2)
                pools.append(pool)
                cluster = PostgresCluster(pool, postgres_dsn, replica=name, keepalive_s=0.5)
                server = await stack.enter_async_context(running_server(config, cluster=cluster))
                channel = await stack.enter_async_context(grpc.aio.insecure_channel(server.address))
                out.append(Replica(server, channel))
            yield out[0], out[1]
    finally:
        for pool in pools:
            await pool.close()


class SeenClaims:
    """The replica's idempotency storage, recording what each claim found (delegating)."""

    def __init__(self, inner: IdempotencyStorage) -> None:
        self.inner = inner
        self.found: list[Claim] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def claim(self, handle: bytes, claim_id: bytes, **kwargs: Any) -> Claim:
        found = await self.inner.claim(handle, claim_id, **kwargs)
        self.found.append(found)
        return found


async def test_the_same_request_on_two_replicas_at_once_is_carried_out_once(
    pg_replicas: tuple[Replica, Replica], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pg_replicas
    phone = await pair_device(a.server, "ada")
    user_id = await a.server.app.identity.user_id_by_name("ada")
    codes_before = await _pairing_codes(a, user_id)
    # A's call holds inside its work until B has received the same request; B's work is
    # recorded if it ever starts.
    started = {"a": asyncio.Event(), "b": asyncio.Event()}
    go_on = asyncio.Event()
    for name, replica in (("a", a), ("b", b)):
        identity = replica.server.app.identity
        real = identity.create_pairing_code

        async def work(user: int, real: Any = real, name: str = name) -> tuple[str, int]:
            started[name].set()
            if name == "a":
                async with asyncio.timeout(WITHIN_S):
                    await go_on.wait()
            return await real(user)  # type: ignore[no-any-return]

        monkeypatch.setattr(identity, "create_pairing_code", work)
    seen_on_b = SeenClaims(b.server.app.rpc.idempotency._storage)
    monkeypatch.setattr(b.server.app.rpc.idempotency, "_storage", seen_on_b)

    request = devices_pb2.CreatePairingCodeRequest(request_id=str(uuid.uuid4()))
    on_a = asyncio.ensure_future(
        a.devices.CreatePairingCode(request, metadata=phone.metadata, timeout=WITHIN_S)
    )
    await asyncio.wait_for(started["a"].wait(), WITHIN_S)
    on_b = asyncio.ensure_future(
        b.devices.CreatePairingCode(request, metadata=phone.metadata, timeout=WITHIN_S)
    )

    async def b_waits_or_works() -> bool:
        return started["b"].is_set() or any(
            not c.held and c.answer is None for c in seen_on_b.found
        )

    await until(b_waits_or_works, WITHIN_S)
    go_on.set()
    first, second = await asyncio.gather(on_a, on_b)
    assert not started["b"].is_set()  # B never carried the call out
    assert second.pairing_code == first.pairing_code
    assert second.expire_time == first.expire_time
    assert await _pairing_codes(a, user_id) == codes_before + 1


async def test_a_refused_call_leaves_no_claim_behind(
    pg_replicas: tuple[Replica, Replica],
) -> None:
    a, b = pg_replicas
    phone = await pair_device(a.server, "ada")
    request = devices_pb2.RevokeDeviceRequest(
        device_id="dev_0000000000000000", request_id=str(uuid.uuid4())
    )
    # Refused on A, then retried on B: B decides afresh at once (a claim left behind would
    # hold B's retry for 30 s, past this deadline).
    for replica in (a, b):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await replica.devices.RevokeDevice(request, metadata=phone.metadata, timeout=20)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        info = error_info(err.value)
        assert info is not None
        assert info.reason == "DEVICE_NOT_FOUND"


async def _pairing_codes(r: Replica, user_id: int) -> int:
    pool = r.server.app.storage.pool
    assert pool is not None
    return int(
        await pool.fetchval("SELECT count(*) FROM pairing_codes WHERE user_id = $1", user_id)
    )

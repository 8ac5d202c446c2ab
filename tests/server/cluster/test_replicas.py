"""Two server replicas sharing one database, told of each other's changes over PostgreSQL.

Each replica is a real gRPC server with its own cluster (its own pool, LISTEN connection and
lease memberships) on a real PostgreSQL; their data is one shared database file. The periodic
fallbacks (the consent sync, the revocation sweep) are slowed to an hour, so what crosses
between replicas here crosses by the doorbell. The nudge features follow each replica's own
ingest (`events_feed=False`): the events are in the shared file, not in PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from pulsesync.server import app as app_module
from pulsesync.server import compose
from pulsesync.server import identity as identity_module
from pulsesync.server.app import RunningServer, running_server
from pulsesync.server.config import ServerConfig
from pulsesync.server.postgres_cluster import PostgresCluster
from pulsesync.server.privacy.keys import RECEIPT_KEY_ENV
from pulsesync.server.profiles.crypto import KEK_ENV, FileKeyStore
from pulsesync.server.storage.database_url import parse_database, parse_key_vault
from pulsesync.server.storage.nudges import DecisionRow, NewNudge, NudgeRow
from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.status import error_info
from pulsesync.v1 import (
    common_pb2,
    devices_pb2,
    devices_pb2_grpc,
    nudges_pb2,
    nudges_pb2_grpc,
    privacy_pb2,
    privacy_pb2_grpc,
    profiles_pb2,
    profiles_pb2_grpc,
)
from tests.server.profiles.test_rpc import update_request
from tests.support.postgres import fresh_database, until
from tests.support.server import pair_device

ACTIVITY = common_pb2.CONSENT_CATEGORY_ACTIVITY
WITHIN_S = 30.0  # generous: this machine is shared and slow


@dataclass
class Replica:
    server: RunningServer
    cluster: PostgresCluster
    channel: grpc.aio.Channel


@pytest.fixture
async def replicas(
    tmp_path: Path, migrated_pool: PostgresPool, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Replica, Replica]]:
    monkeypatch.setattr(compose, "CONSENT_SYNC_SECONDS", 3600.0)
    monkeypatch.setattr(app_module, "REVOCATION_SWEEP_SECONDS", 3600.0)
    config = ServerConfig(port=0, data_dir=tmp_path, grace_seconds=0.5)
    out: list[Replica] = []
    pools: list[PostgresPool] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            for name in ("a", "b"):
                pool = await PostgresPool.open(postgres_dsn, max_size=4)
                pools.append(pool)
                cluster = PostgresCluster(
                    pool, postgres_dsn, replica=name, keepalive_s=0.5, events_feed=False
                )
                server = await stack.enter_async_context(running_server(config, cluster=cluster))
                channel = await stack.enter_async_context(grpc.aio.insecure_channel(server.address))
                out.append(Replica(server, cluster, channel))
            yield out[0], out[1]
    finally:
        for pool in pools:
            await pool.close()


async def test_a_profile_update_on_a_reaches_a_watch_on_b(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    phone = await pair_device(a.server, "ada", kind=common_pb2.DEVICE_KIND_PHONE)
    laptop = await pair_device(a.server, "ada", kind=common_pb2.DEVICE_KIND_DESKTOP)
    on_b = profiles_pb2_grpc.ProfileServiceStub(b.channel)
    on_a = profiles_pb2_grpc.ProfileServiceStub(a.channel)
    await on_a.UpdateProfile(update_request(phone, 0, daily_steps=5000), metadata=phone.metadata)
    watch = on_b.WatchProfile(
        profiles_pb2.WatchProfileRequest(), metadata=laptop.metadata, timeout=WITHIN_S
    )
    first: Any = await watch.read()
    assert first.profile.version == 1
    for n in (2, 3):
        resp = await on_a.UpdateProfile(
            update_request(phone, n - 1, daily_steps=5000 + n), metadata=phone.metadata
        )
        assert resp.committed
    # Both versions committed on A arrive on B's stream, in order, read from storage.
    second: Any = await watch.read()
    assert second.profile.goals.daily_steps == 5002
    third: Any = await watch.read()
    assert (third.profile.version, third.profile.goals.daily_steps) == (3, 5003)
    watch.cancel()


async def test_a_consent_change_on_a_reaches_watch_consents_on_b(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    phone = await pair_device(a.server, "ada", consents=())
    laptop = await pair_device(a.server, "ada", consents=())
    watch = privacy_pb2_grpc.PrivacyServiceStub(b.channel).WatchConsents(
        privacy_pb2.WatchConsentsRequest(), metadata=laptop.metadata, timeout=WITHIN_S
    )
    first: Any = await watch.read()
    assert not any(c.granted for c in first.consents)
    await privacy_pb2_grpc.PrivacyServiceStub(a.channel).UpdateConsent(
        privacy_pb2.UpdateConsentRequest(category=ACTIVITY, granted=True),
        metadata=phone.metadata,
    )
    changed: Any = await watch.read()
    assert {c.category for c in changed.consents if c.granted} == {ACTIVITY}
    user_id = await b.server.app.identity.user_id_by_name("ada")
    assert ACTIVITY in await b.server.app.consent.granted(user_id)  # B's cache is fresh too
    watch.cancel()


async def test_a_revocation_on_a_cuts_the_device_streams_on_both(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    phone = await pair_device(a.server, "ada")
    laptop = await pair_device(a.server, "ada")
    streams = [
        profiles_pb2_grpc.ProfileServiceStub(r.channel).WatchProfile(
            profiles_pb2.WatchProfileRequest(), metadata=laptop.metadata, timeout=WITHIN_S
        )
        for r in (a, b)
    ]
    for r in (a, b):  # both streams are open (registered) before the revocation
        await until(_connected_on(r), WITHIN_S)
    await devices_pb2_grpc.DeviceServiceStub(a.channel).RevokeDevice(
        devices_pb2.RevokeDeviceRequest(device_id=laptop.device_id), metadata=phone.metadata
    )
    for stream in streams:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async with asyncio.timeout(WITHIN_S):
                await stream.read()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info = error_info(err.value)
        assert info is not None
        assert info.reason == "DEVICE_REVOKED"


def _connected_on(r: Replica) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return r.server.app.sessions.connected_device_count() > 0

    return check


async def test_a_nudge_made_on_a_is_delivered_on_the_stream_b_holds(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    phone = await pair_device(a.server, "ada")
    stream = nudges_pb2_grpc.NudgeServiceStub(b.channel).SubscribeNudges(
        nudges_pb2.SubscribeNudgesRequest(), metadata=phone.metadata, timeout=WITHIN_S
    )
    await until(_connected_on(b), WITHIN_S)
    ident = await a.server.app.identity.authenticate(phone.token)
    now = a.server.app.clock.now_us()
    row = NudgeRow(
        "ndg_0123456789abcdef", "move", "Time to move", "A short walk?", "{}", 0.5, "[]",
        now, now + 3_600_000_000,
    )  # fmt: skip
    # A's engine decided (its storage committed the decision and the nudge) and routes it
    # to the phone, which has no stream on A.
    await a.server.app.nudges._storage.log_decision(
        DecisionRow(
            ident.user_id, now, "schedule", "cold-start", "{}", json.dumps({"move": 0.5}),
            "{}", "move", 0.5, "{}",
        ),
        NewNudge(row, ident.device_pk, "steps"),
    )  # fmt: skip
    a.server.app.nudges.delivery.send(ident.device_pk, nudges_pb2.Nudge(nudge_id=row.nudge_id))
    got: Any = await stream.read()
    assert got.nudge.nudge_id == row.nudge_id
    assert got.nudge.title == "Time to move"  # read from storage, not carried by the ring
    assert got.nudge.device_id == phone.device_id
    stream.cancel()


async def test_an_erasure_on_a_cuts_the_persons_streams_on_b(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    phone = await pair_device(a.server, "ada")
    laptop = await pair_device(a.server, "ada")
    stream = profiles_pb2_grpc.ProfileServiceStub(b.channel).WatchProfile(
        profiles_pb2.WatchProfileRequest(), metadata=laptop.metadata, timeout=WITHIN_S
    )
    await until(_connected_on(b), WITHIN_S)
    await privacy_pb2_grpc.PrivacyServiceStub(a.channel).EraseData(
        privacy_pb2.EraseDataRequest(confirmation="ERASE"), metadata=phone.metadata
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async with asyncio.timeout(WITHIN_S):
            await stream.read()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(err.value)
    assert info is not None
    assert info.reason == "USER_ERASED"


async def test_a_page_token_from_one_replica_is_good_on_another(
    tmp_path: Path, postgres_database: str, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicas with data directories of their own (nothing shared but the database, the key
    vault and the key-encryption key) page for each other: the token key is in the database."""
    monkeypatch.setenv(KEK_ENV, FileKeyStore.create(tmp_path / "kek.key").path.read_text())
    monkeypatch.setenv(RECEIPT_KEY_ENV, secrets.token_hex(32))
    async with contextlib.AsyncExitStack() as stack:
        vault = await stack.enter_async_context(fresh_database(postgres_database))
        a, b = [
            await stack.enter_async_context(
                running_server(
                    ServerConfig(
                        port=0,
                        data_dir=tmp_path / name,
                        grace_seconds=0.5,
                        database_url=parse_database(postgres_dsn),
                        key_vault=parse_key_vault(vault),
                    )
                )
            )
            for name in ("a", "b")
        ]
        phone = await pair_device(a, "ada")
        await pair_device(a, "ada")
        pages: list[devices_pb2.ListDevicesResponse] = []
        for server in (a, b):
            async with grpc.aio.insecure_channel(server.address) as ch:
                pages.append(
                    await devices_pb2_grpc.DeviceServiceStub(ch).ListDevices(
                        devices_pb2.ListDevicesRequest(
                            page_size=1, page_token=pages[-1].next_page_token if pages else ""
                        ),
                        metadata=phone.metadata,
                        timeout=WITHIN_S,
                    )
                )
        first, second = pages
        assert first.next_page_token
        assert len({d.device_id for p in pages for d in p.devices}) == 2
        assert not second.next_page_token


async def test_a_token_replaced_on_a_is_refused_at_once_on_b_that_cached_it(
    replicas: tuple[Replica, Replica], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cached for an hour: without the ring, B would accept the replaced token that long.
    monkeypatch.setattr(identity_module, "TOKEN_CACHE_US", 3600 * 1_000_000)
    a, b = replicas
    phone = await pair_device(a.server, "ada")
    on_a = devices_pb2_grpc.DeviceServiceStub(a.channel)
    on_b = devices_pb2_grpc.DeviceServiceStub(b.channel)

    async def rotate(token: str) -> str:
        resp = await on_a.RotateDeviceToken(
            devices_pb2.RotateDeviceTokenRequest(), metadata=_bearer(token), timeout=WITHIN_S
        )
        return str(resp.token)

    first = await rotate(phone.token)
    assert await _who(on_b, first) == phone.device_id  # B caches the new token
    # The device lost the answer and retries with the token it holds: the token it never
    # received is replaced (the "lost response" path of RotateDeviceToken).
    second = await rotate(phone.token)

    async def refused_on_b() -> bool:
        try:
            await _who(on_b, first)
        except grpc.aio.AioRpcError as e:
            info = error_info(e)
            assert info is not None
            assert info.reason == "TOKEN_UNKNOWN"
            return True
        return False

    await until(refused_on_b, WITHIN_S)
    # The current token and the one still in its grace period work on both.
    for stub in (on_a, on_b):
        assert await _who(stub, second) == phone.device_id
        assert await _who(stub, phone.token) == phone.device_id


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _who(stub: Any, token: str) -> str:
    resp = await stub.GetCurrentDevice(
        devices_pb2.GetCurrentDeviceRequest(), metadata=_bearer(token), timeout=WITHIN_S
    )
    return str(resp.device.device_id)

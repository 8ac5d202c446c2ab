from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from pulsesync.server.app import RunningServer
from pulsesync.server.privacy.consent import CURRENT_POLICY_VERSION, ConsentStore
from pulsesync.status import error_info
from pulsesync.v1 import common_pb2, privacy_pb2, privacy_pb2_grpc
from tests.server.privacy.support import user_id
from tests.support.server import pair_device

BEHAVIOR = common_pb2.CONSENT_CATEGORY_BEHAVIOR
ACTIVITY = common_pb2.CONSENT_CATEGORY_ACTIVITY


def granted(resp: Any) -> set[int]:
    return {c.category for c in resp.consents if c.granted}


async def test_nothing_is_granted_by_default(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    phone = await pair_device(server, "ada", consents=())
    stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
    resp = await stub.GetConsents(
        privacy_pb2.GetConsentsRequest(), metadata=phone.metadata, timeout=5
    )
    assert len(resp.consents) == 4
    assert granted(resp) == set()
    assert all(not c.HasField("update_time") for c in resp.consents)


async def test_update_is_recorded_in_the_ledger_with_device_and_policy(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    phone = await pair_device(server, "ada", consents=())
    stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
    resp = await stub.UpdateConsent(
        privacy_pb2.UpdateConsentRequest(category=ACTIVITY, granted=True, policy_version="2026-07"),
        metadata=phone.metadata,
        timeout=5,
    )
    assert resp.consent.granted
    assert resp.consent.device_id == phone.device_id
    assert resp.consent.policy_version == "2026-07"
    await stub.UpdateConsent(
        privacy_pb2.UpdateConsentRequest(category=ACTIVITY, granted=False),
        metadata=phone.metadata,
        timeout=5,
    )
    uid = await user_id(server, "ada")
    assert await server.app.consent.granted(uid) == frozenset()
    async with server.app.db.reader.execute(
        "SELECT category, granted, policy_version, device_id FROM consent_ledger"
        " WHERE user_id = ? ORDER BY entry_id",
        (uid,),
    ) as c:
        ledger = list(await c.fetchall())
    assert ledger == [
        (ACTIVITY, 1, "2026-07", phone.device_id),
        (ACTIVITY, 0, CURRENT_POLICY_VERSION, phone.device_id),
    ]


async def test_bad_category_is_invalid_argument(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    phone = await pair_device(server, "ada", consents=())
    stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
    for category in (0, 99):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UpdateConsent(
                privacy_pb2.UpdateConsentRequest(category=category, granted=True),  # type: ignore[arg-type]
                metadata=phone.metadata,
                timeout=5,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info(err.value)
        assert info is not None
        assert info.reason == "INVALID_CONSENT_CATEGORY"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UpdateConsent(
            privacy_pb2.UpdateConsentRequest(
                category=BEHAVIOR, granted=True, policy_version="v" * 65
            ),
            metadata=phone.metadata,
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # the server keeps working for this device
    resp = await stub.GetConsents(
        privacy_pb2.GetConsentsRequest(), metadata=phone.metadata, timeout=5
    )
    assert granted(resp) == set()


async def test_changes_reach_the_other_devices_live(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    phone = await pair_device(server, "ada", consents=())
    laptop = await pair_device(server, "ada", kind=common_pb2.DEVICE_KIND_DESKTOP)
    other = await pair_device(server, "bo", consents=())
    stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
    watch = stub.WatchConsents(
        privacy_pb2.WatchConsentsRequest(), metadata=laptop.metadata, timeout=10
    )
    other_watch = stub.WatchConsents(
        privacy_pb2.WatchConsentsRequest(), metadata=other.metadata, timeout=10
    )
    first = await watch.read()
    assert granted(first) == set()
    assert granted(await other_watch.read()) == set()

    await stub.UpdateConsent(
        privacy_pb2.UpdateConsentRequest(category=BEHAVIOR, granted=True),
        metadata=phone.metadata,
        timeout=5,
    )
    change: Any = await asyncio.wait_for(watch.read(), 5)
    assert granted(change) == {BEHAVIOR}
    changed = next(c for c in change.consents if c.category == BEHAVIOR)
    assert changed.device_id == phone.device_id

    await stub.UpdateConsent(
        privacy_pb2.UpdateConsentRequest(category=BEHAVIOR, granted=False),
        metadata=phone.metadata,
        timeout=5,
    )
    assert granted(await asyncio.wait_for(watch.read(), 5)) == set()
    # another person's stream saw nothing of it
    read = asyncio.ensure_future(other_watch.read())
    done, _ = await asyncio.wait({read}, timeout=0.3)
    assert not done
    read.cancel()
    watch.cancel()
    other_watch.cancel()


async def test_changes_made_by_another_process_reach_streams_and_ingest_cache(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    phone = await pair_device(server, "ada", consents=())
    uid = await user_id(server, "ada")
    stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
    watch = stub.WatchConsents(
        privacy_pb2.WatchConsentsRequest(), metadata=phone.metadata, timeout=10
    )
    assert granted(await watch.read()) == set()
    assert await server.app.consent.granted(uid) == frozenset()  # now cached
    await server.app.consent.sync_external()  # as the background tick does

    # the admin CLI writes through its own store on its own connection
    from pulsesync.server.clock import SystemClock
    from pulsesync.server.storage.db import Database
    from pulsesync.server.storage.sqlite.consent import SqliteConsentStorage

    async with await Database.open(server.app.db.path) as other_db:
        await ConsentStore(SqliteConsentStorage(other_db), SystemClock()).set(
            uid, ACTIVITY, True, device_id="admin"
        )

    assert await server.app.consent.sync_external() == 1
    assert await server.app.consent.granted(uid) == frozenset({ACTIVITY})
    assert granted(await asyncio.wait_for(watch.read(), 5)) == {ACTIVITY}
    # the server's own changes are not re-announced by the sync
    await server.app.consent.set(uid, BEHAVIOR, True, device_id="x")
    assert granted(await asyncio.wait_for(watch.read(), 5)) == {ACTIVITY, BEHAVIOR}
    assert await server.app.consent.sync_external() == 0
    watch.cancel()

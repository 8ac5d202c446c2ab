"""ProfileService over real gRPC: watch across devices, resume, isolation, consent, layout."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from pulsesync.hlc import Stamp
from pulsesync.server.app import RunningServer
from pulsesync.server.bus import CommittedEvent
from pulsesync.status import error_info
from pulsesync.v1 import common_pb2, events_pb2, profiles_pb2, profiles_pb2_grpc
from tests.support.server import PairedDevice, pair_device


async def next_version(watch: Any) -> profiles_pb2.WatchProfileResponse:
    """The next message of a watch stream (within 5 s)."""
    msg = await asyncio.wait_for(watch.read(), 5)
    assert isinstance(msg, profiles_pb2.WatchProfileResponse)
    return msg


def update_request(
    device: PairedDevice, base: int, **goals: int
) -> profiles_pb2.UpdateProfileRequest:
    wall = time.time_ns() // 1_000_000
    req = profiles_pb2.UpdateProfileRequest(base_version=base)
    for i, (name, value) in enumerate(sorted(goals.items())):
        setattr(req.profile.goals, name, value)
        req.edits.add(field_path=f"goals.{name}", stamp=Stamp(wall, i, device.device_id).to_proto())
    return req


async def test_change_on_a_reaches_b_open_stream(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    a = await pair_device(server, "ada", kind=common_pb2.DEVICE_KIND_PHONE)
    b = await pair_device(server, "ada", kind=common_pb2.DEVICE_KIND_DESKTOP)
    stub = profiles_pb2_grpc.ProfileServiceStub(channel)
    watch = stub.WatchProfile(profiles_pb2.WatchProfileRequest(), metadata=b.metadata, timeout=10)
    await asyncio.sleep(0)  # the stream is open before the write (the store queues anyway)
    resp = await stub.UpdateProfile(
        update_request(a, 0, daily_steps=9000), metadata=a.metadata, timeout=5
    )
    assert resp.committed
    assert resp.profile.version == 1
    got = await next_version(watch)
    assert got.profile.goals.daily_steps == 9000
    assert got.profile.update_device_id == a.device_id
    assert got.profile.field_stamps["goals.daily_steps"].node_id == a.device_id
    watch.cancel()


async def test_reconnect_resumes_without_gaps(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    a = await pair_device(server, "ada")
    b = await pair_device(server, "ada")
    stub = profiles_pb2_grpc.ProfileServiceStub(channel)
    for n in range(1, 4):
        await stub.UpdateProfile(
            update_request(a, n - 1, daily_steps=1000 * n), metadata=a.metadata, timeout=5
        )
    # A device with nothing gets only the latest snapshot.
    fresh = stub.WatchProfile(profiles_pb2.WatchProfileRequest(), metadata=b.metadata, timeout=10)
    first = await next_version(fresh)
    assert first.profile.version == 3
    assert first.profile.goals.daily_steps == 3000
    fresh.cancel()
    # B last saw version 1: it gets 2 and 3 first, then 4 and 5 live, in order.
    watch = stub.WatchProfile(
        profiles_pb2.WatchProfileRequest(after_version=1), metadata=b.metadata, timeout=10
    )
    seen = [(await next_version(watch)).profile.version for _ in range(2)]

    async def writes() -> None:
        for n in range(4, 6):
            await stub.UpdateProfile(
                update_request(a, n - 1, daily_steps=1000 * n), metadata=a.metadata, timeout=5
            )

    writer = asyncio.create_task(writes())
    seen += [(await next_version(watch)).profile.version for _ in range(2)]
    await writer
    assert seen == [2, 3, 4, 5]
    watch.cancel()


async def test_no_version_is_missed_between_read_and_subscribe(server: RunningServer) -> None:
    """Writes racing with many watch openings: every watcher sees a gap-free sequence."""
    user_id = await server.app.identity.add_user("cy")
    store = server.app.profiles

    async def edit(n: int) -> None:
        await store.edit(user_id, lambda p: setattr(p.goals, "daily_steps", 100 + n))

    await edit(0)

    async def watcher(after: int, until: int) -> list[int]:
        out = []
        async for p in store.watch(user_id, after):
            out.append(p.version)
            if p.version >= until:
                return out
        return out

    watchers = [asyncio.create_task(watcher(1, 21)) for _ in range(10)]
    for n in range(1, 21):
        await edit(n)
        await asyncio.sleep(0)
    for w in watchers:
        assert await asyncio.wait_for(w, 5) == list(range(2, 22))


async def test_user_a_cannot_read_or_watch_user_b(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    ada = await pair_device(server, "ada")
    bo = await pair_device(server, "bo")
    stub = profiles_pb2_grpc.ProfileServiceStub(channel)
    await stub.UpdateProfile(
        update_request(bo, 0, daily_steps=4242), metadata=bo.metadata, timeout=5
    )
    mine = await stub.GetProfile(profiles_pb2.GetProfileRequest(), metadata=ada.metadata, timeout=5)
    assert mine.profile.version == 0
    assert mine.profile.goals.daily_steps == 0
    # Ada's watch, even asking from version 0, never sees Bo's versions.
    watch = stub.WatchProfile(profiles_pb2.WatchProfileRequest(), metadata=ada.metadata, timeout=10)
    await stub.UpdateProfile(
        update_request(bo, 1, daily_steps=4343), metadata=bo.metadata, timeout=5
    )
    await stub.UpdateProfile(
        update_request(ada, 0, daily_steps=7), metadata=ada.metadata, timeout=5
    )
    first = await next_version(watch)
    assert first.profile.goals.daily_steps == 7
    watch.cancel()
    # Stamps naming another device are refused: a device cannot write as someone else.
    forged = update_request(bo, 0, daily_steps=1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UpdateProfile(forged, metadata=ada.metadata, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(err.value)
    assert info is not None
    assert info.reason == "STAMP_NODE_MISMATCH"
    # And without a token nothing at all.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetProfile(profiles_pb2.GetProfileRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_sync_needs_consent(server: RunningServer, channel: grpc.aio.Channel) -> None:
    dev = await pair_device(server, "dee", consents=())
    stub = profiles_pb2_grpc.ProfileServiceStub(channel)
    for call in (
        lambda: stub.UpdateProfile(
            update_request(dev, 0, daily_steps=1), metadata=dev.metadata, timeout=5
        ),
        lambda: stub.WatchProfile(
            profiles_pb2.WatchProfileRequest(), metadata=dev.metadata, timeout=5
        ).read(),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = error_info(err.value)
        assert info is not None
        assert info.reason == "CONSENT_REQUIRED"
        assert "UpdateConsent" in (err.value.details() or "")
    # Granted: works; withdrawn while watching: the stream ends with CONSENT_REQUIRED.
    user_id = await server.app.identity.user_id_by_name("dee")
    sync = common_pb2.CONSENT_CATEGORY_SYNC
    await server.app.consent.set(user_id, sync, True, device_id=dev.device_id)
    await stub.UpdateProfile(
        update_request(dev, 0, daily_steps=1), metadata=dev.metadata, timeout=5
    )
    watch = stub.WatchProfile(profiles_pb2.WatchProfileRequest(), metadata=dev.metadata, timeout=10)
    assert (await next_version(watch)).profile.version == 1
    await server.app.consent.set(user_id, sync, False, device_id=dev.device_id)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await next_version(watch)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(err.value)
    assert info is not None
    assert info.reason == "CONSENT_REQUIRED"


def usage(user_id: int, seq: int, t_us: int, feature: str = "", screen: str = "") -> CommittedEvent:
    event = events_pb2.Event(seq=seq)
    if feature:
        event.feature_use.app = "study"
        event.feature_use.feature = feature
        kind = events_pb2.EVENT_KIND_FEATURE_USE
    else:
        event.screen_view.app = "study"
        event.screen_view.screen = screen
        kind = events_pb2.EVENT_KIND_SCREEN_VIEW
    return CommittedEvent(user_id, 1, seq, t_us, kind, event.SerializeToString())


async def test_adaptive_layout_ranks_recent_use_unless_pinned(server: RunningServer) -> None:
    dev = await pair_device(server, "eve")
    user_id = await server.app.identity.user_id_by_name("eve")
    store = server.app.profiles
    assert store.layout is not None
    day = 24 * 3600 * 1_000_000
    t0 = 1_767_225_600_000_000
    # A month ago: lots of "quiz"; this week: some "flashcards", screens of "notes".
    old = [usage(user_id, i, t0, feature="quiz") for i in range(8)]
    recent = [usage(user_id, 100 + i, t0 + 30 * day, feature="flashcards") for i in range(3)]
    screens = [usage(user_id, 200 + i, t0 + 30 * day, screen="notes") for i in range(2)]
    server.app.bus.publish(user_id, old)
    server.app.bus.publish(user_id, [*recent, *screens])
    await asyncio.wait_for(store.layout.drain(), 5)
    profile = await store.get(user_id)
    # 8 uses decayed over ~4.3 half-lives (~0.4) < 1 screen-weighted notes (1.0) < 3 flashcards.
    assert list(profile.layout.usage_ranking) == ["flashcards", "notes", "quiz"]
    assert list(profile.layout.feature_order) == ["flashcards", "notes", "quiz"]
    assert profile.field_stamps["layout.usage_ranking"].node_id == "server"
    # The person pins their own order: it wins; ranking keeps updating underneath.
    channel = grpc.aio.insecure_channel(server.address)
    stub = profiles_pb2_grpc.ProfileServiceStub(channel)
    req = profiles_pb2.UpdateProfileRequest(base_version=profile.version)
    req.profile.layout.pinned_order[:] = ["quiz", "notes"]
    req.edits.add(
        field_path="layout.pinned_order",
        stamp=Stamp(time.time_ns() // 1_000_000, 0, dev.device_id).to_proto(),
    )
    await stub.UpdateProfile(req, metadata=dev.metadata, timeout=5)
    server.app.bus.publish(
        user_id, [usage(user_id, 300 + i, t0 + 31 * day, feature="quiz") for i in range(9)]
    )
    await asyncio.wait_for(store.layout.drain(), 5)
    profile = await store.get(user_id)
    assert next(iter(profile.layout.usage_ranking)) == "quiz"
    assert list(profile.layout.feature_order) == ["quiz", "notes"]
    # Devices cannot write the ranking itself.
    bad = profiles_pb2.UpdateProfileRequest(base_version=profile.version)
    bad.profile.layout.usage_ranking.append("x")
    bad.edits.add(
        field_path="layout.usage_ranking",
        stamp=Stamp(time.time_ns() // 1_000_000, 0, dev.device_id).to_proto(),
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UpdateProfile(bad, metadata=dev.metadata, timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await channel.close(None)
    # Scores survive a restart of the ranker: they are stored per user.
    async with server.app.db.reader.execute(
        "SELECT feature FROM profile_feature_usage WHERE user_id = ? ORDER BY feature", (user_id,)
    ) as cur:
        assert [r[0] for r in await cur.fetchall()] == ["flashcards", "notes", "quiz"]


async def test_erasure_hook_and_exporter_are_registered(server: RunningServer) -> None:
    assert "profiles" in [name for name, _ in server.app.user_data.erase_hooks]
    assert "profile" in server.app.user_data.exporters


async def test_feature_use_uploaded_by_one_device_reorders_the_layout_on_another(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    """End to end: ingest commits FEATURE_USE events, the ranking reaches B's watch."""
    from google.protobuf import timestamp_pb2

    from pulsesync.v1 import ingest_pb2, ingest_pb2_grpc

    phone = await pair_device(server, "fay", kind=common_pb2.DEVICE_KIND_PHONE)
    desktop = await pair_device(server, "fay", kind=common_pb2.DEVICE_KIND_DESKTOP)
    stub = profiles_pb2_grpc.ProfileServiceStub(channel)
    watch = stub.WatchProfile(
        profiles_pb2.WatchProfileRequest(), metadata=desktop.metadata, timeout=10
    )
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    batch = ingest_pb2.EventBatch(batch_id=1, sent_time=now)
    for seq, feature in enumerate(["timer", "flashcards", "flashcards", "flashcards", "timer"], 1):
        event = batch.events.add(event_id=f"00000000-0000-4000-8000-{seq:012d}", seq=seq)
        event.device_time.CopyFrom(now)
        event.feature_use.app = "study"
        event.feature_use.feature = feature
    resp = await ingest_pb2_grpc.IngestServiceStub(channel).UploadBatch(
        ingest_pb2.UploadBatchRequest(batch=batch), metadata=phone.metadata, timeout=5
    )
    assert resp.ack.accepted_count == 5
    got = await next_version(watch)
    assert list(got.profile.layout.feature_order) == ["flashcards", "timer"]
    assert got.profile.update_device_id == "server"
    watch.cancel()

"""Device-side profile sync against a real server: offline edits, reconnect, subscribe."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from pulsesync.edge_agent.profiles import ProfileSync
from pulsesync.server.app import RunningServer
from pulsesync.v1 import common_pb2, profiles_pb2, profiles_pb2_grpc
from tests.support.server import PairedDevice, pair_device


@contextlib.asynccontextmanager
async def online(
    sync: ProfileSync, server: RunningServer, dev: PairedDevice
) -> AsyncIterator[None]:
    """Run the device's sync loop while inside (offline outside)."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        task = asyncio.create_task(sync.run(channel, dev.metadata))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def offline_edits(a: ProfileSync, b: ProfileSync) -> None:
    """Different and same fields edited on both while offline (B's clock runs later)."""

    def on_a(p: profiles_pb2.Profile) -> None:
        p.goals.daily_steps = 8000
        p.time_zone = "Europe/Paris"
        p.preferences.theme = "dark"
        p.continuity_items.add(app="reader", item_id="dune", position="page=40", progress=0.2)

    def on_b(p: profiles_pb2.Profile) -> None:
        p.goals.daily_study_minutes = 45
        p.time_zone = "Asia/Tokyo"
        p.muted_nudge_types.append("hydrate")
        p.continuity_items.add(app="reader", item_id="dune", position="page=55", progress=0.3)

    a.edit(on_a)
    b.edit(on_b)


@pytest.mark.parametrize("a_first", [True, False])
async def test_offline_edits_converge_in_either_order(
    server: RunningServer, tmp_path: Path, a_first: bool
) -> None:
    dev_a = await pair_device(server, "ada", kind=common_pb2.DEVICE_KIND_PHONE)
    dev_b = await pair_device(server, "ada", kind=common_pb2.DEVICE_KIND_DESKTOP)
    base = 1_767_225_600_000
    a = ProfileSync(tmp_path / "a", dev_a.device_id, wall_ms=lambda: base)
    b = ProfileSync(tmp_path / "b", dev_b.device_id, wall_ms=lambda: base + 5)
    offline_edits(a, b)
    assert a.profile().time_zone == "Europe/Paris"  # the local view shows pending edits
    assert a.pending_paths
    first, second = ((a, dev_a), (b, dev_b)) if a_first else ((b, dev_b), (a, dev_a))
    async with online(first[0], server, first[1]):
        await first[0].wait_for(lambda p: p.version >= 1)
    async with online(second[0], server, second[1]), online(first[0], server, first[1]):
        await a.wait_for(lambda p: p.version >= 2 and not a.pending_paths)
        await b.wait_for(lambda p: p.version >= 2 and not b.pending_paths)
        final = await a.wait_for(lambda p: p.version == b.version)
    assert final == b.profile()
    # Different fields both kept; the same fields went to B's later stamps (LWW).
    assert final.goals.daily_steps == 8000
    assert final.goals.daily_study_minutes == 45
    assert final.preferences.theme == "dark"
    assert list(final.muted_nudge_types) == ["hydrate"]
    assert final.time_zone == "Asia/Tokyo"
    assert [(i.item_id, i.position) for i in final.continuity_items] == [("dune", "page=55")]


async def test_change_reaches_subscriber_and_state_survives_restart(
    server: RunningServer, tmp_path: Path
) -> None:
    dev_a = await pair_device(server, "ada")
    dev_b = await pair_device(server, "ada")
    a = ProfileSync(tmp_path / "a", dev_a.device_id)
    b = ProfileSync(tmp_path / "b", dev_b.device_id)
    seen: list[profiles_pb2.Profile] = []
    b.subscribe(seen.append)
    async with online(a, server, dev_a), online(b, server, dev_b):

        def watch_video(p: profiles_pb2.Profile) -> None:
            p.continuity_items.add(app="video", item_id="ep1", position="t=1312s")

        a.edit(watch_video)
        got = await b.wait_for(lambda p: len(p.continuity_items) == 1)
        assert got.continuity_items[0].position == "t=1312s"
        assert seen[-1].continuity_items[0].position == "t=1312s"
        # Removing an item is a tombstone that reaches B too.
        a.edit(lambda p: p.ClearField("continuity_items"))
        await b.wait_for(lambda p: not p.continuity_items)
        # B can see the change before A has its answer (the server keeps the answer for
        # retries after committing): leave A online until its edit is acknowledged.
        await a.wait_for(lambda p: not a.pending_paths)
    # Offline edit, then the agent restarts: the queued edit is kept on disk and sent later.
    a.edit(lambda p: setattr(p.goals, "daily_steps", 12000))
    a2 = ProfileSync(tmp_path / "a", dev_a.device_id)
    assert a2.pending_paths == ["goals.daily_steps"]
    assert a2.profile().goals.daily_steps == 12000
    version_before = a2.version
    async with online(a2, server, dev_a), online(b, server, dev_b):
        await b.wait_for(lambda p: p.goals.daily_steps == 12000)
        await a2.wait_for(lambda p: not a2.pending_paths and p.version > version_before)


async def test_bad_local_edit_is_refused_and_nothing_queued(tmp_path: Path) -> None:
    sync = ProfileSync(tmp_path, "dev_x")
    with pytest.raises(ValueError, match="IANA"):
        sync.edit(lambda p: setattr(p, "time_zone", "Nowhere/Atlantis"))
    with pytest.raises(ValueError, match="pinned_order"):
        sync.edit(lambda p: p.layout.usage_ranking.append("x"))
    assert sync.pending_paths == []


async def test_server_behind_the_device_resets_and_resends(
    server: RunningServer, tmp_path: Path
) -> None:
    """A device whose last version is newer than the server's (a restored server) starts over
    and still delivers its pending edits."""
    dev = await pair_device(server, "ada")
    sync = ProfileSync(tmp_path, dev.device_id)
    sync.apply_remote(profiles_pb2.Profile(version=40))
    sync.edit(lambda p: setattr(p.preferences, "language", "fr"))
    async with online(sync, server, dev):
        await sync.wait_for(lambda p: not sync.pending_paths and p.version >= 1)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = profiles_pb2_grpc.ProfileServiceStub(channel)
        got = await stub.GetProfile(
            profiles_pb2.GetProfileRequest(), metadata=dev.metadata, timeout=5
        )
    assert got.profile.preferences.language == "fr"


class _StopWatch(Exception):
    """Ends a watch loop from its injected sleep once enough delays were seen."""


async def test_watch_reconnects_with_full_jitter_backoff(tmp_path: Path) -> None:
    import random
    import socket

    from pulsesync.edge_agent import retry

    with socket.socket() as s:  # a port nobody listens on: every attempt fails UNAVAILABLE
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) == 6:
            raise _StopWatch

    sync = ProfileSync(tmp_path, "dev_x")
    backoff = retry.WATCH.backoff(rng=random.Random(5), sleep=sleep)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(_StopWatch):
            await sync.run(channel, (), backoff=backoff)
    ceilings = [retry.WATCH.ceiling(n) for n in range(6)]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    # Jittered: not the bare doubling sequence the watch used to sleep.
    assert delays != ceilings
    assert len(set(delays)) == 6

"""The profile storage seam behaves the same on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

from pulsesync.server.storage.profiles import SealedVersion
from tests.support.storage_backends import Backend


def sealed(version: int, key_id: str = "dk_1") -> SealedVersion:
    return SealedVersion(version, key_id, bytes([version]) * 12, b"ct-%d" % version)


async def test_versions_append_compare_and_set_and_retention(storage_backend: Backend) -> None:
    s = storage_backend.profiles
    ada = await storage_backend.add_user("ada")
    bob = await storage_backend.add_user("bob")
    assert await s.latest(ada) is None
    assert await s.append(ada, 0, sealed(1), "dev_a", 10, keep=2)
    assert not await s.append(ada, 0, sealed(1), "dev_b", 11, keep=2)  # lost the race
    assert await s.append(ada, 1, sealed(2), "dev_a", 12, keep=2)
    assert await s.append(ada, 2, sealed(3, "dk_2"), "dev_a", 13, keep=2)
    assert await s.append(bob, 0, sealed(1), "dev_b", 14, keep=2)
    assert await s.latest(ada) == sealed(3, "dk_2")
    assert await s.version(ada, 1) is None  # older than the newest two: dropped
    assert await s.version(ada, 2) == sealed(2)
    assert await s.version(bob, 2) is None
    assert await s.versions_after(ada, 0) == [sealed(2), sealed(3, "dk_2")]
    assert await s.key_in_use(ada, "dk_2")
    assert await s.key_in_use(ada, "dk_1")
    assert not await s.key_in_use(bob, "dk_2")
    assert await s.users_with_versions() == {ada, bob}
    assert await s.counts() == (3, 2)
    await s.erase_user(ada)
    assert await s.latest(ada) is None
    assert await s.users_with_versions() == {bob}


async def test_concurrent_writers_on_one_base_exactly_one_wins(storage_backend: Backend) -> None:
    s = storage_backend.profiles
    ada = await storage_backend.add_user("ada")
    assert await s.append(ada, 0, sealed(1), "dev_a", 1, keep=5)
    results = await asyncio.gather(
        *(s.append(ada, 1, sealed(2, f"dk_{i}"), f"dev_{i}", 2, keep=5) for i in range(6))
    )
    assert sorted(results) == [False] * 5 + [True]
    assert [v.version for v in await s.versions_after(ada, 0)] == [1, 2]


async def test_usage_scores_upsert_and_drop(storage_backend: Backend) -> None:
    s = storage_backend.profiles
    ada = await storage_backend.add_user("ada")
    bob = await storage_backend.add_user("bob")
    await s.save_usage(ada, {"steps": (1.5, 10), "sleep": (2.0, 10)}, [])
    await s.save_usage(bob, {"steps": (9.0, 10)}, [])
    await s.save_usage(ada, {"steps": (3.0, 20)}, ["sleep"])
    await s.save_usage(ada, {}, [])
    assert await s.usage_scores(ada) == {"steps": (3.0, 20)}
    assert await s.usage_scores(bob) == {"steps": (9.0, 10)}
    await s.erase_user(ada)
    assert await s.usage_scores(ada) == {}
    assert await s.usage_scores(bob) == {"steps": (9.0, 10)}

"""The nudge model registry's storage seam behaves the same on SQLite and PostgreSQL: versions
numbered by the database, metadata, the promoted pointer, and the one-time import."""

from __future__ import annotations

import asyncio

from pulsesync.server.storage.models import ModelStorage, Promoted, StoredModel
from pulsesync.server.storage.postgres.models import PostgresModelStorage
from pulsesync.server.storage.sqlite.models import SqliteModelStorage
from tests.support.storage_backends import Backend


def storage_of(b: Backend) -> ModelStorage:
    if b.pool is not None:
        return PostgresModelStorage(b.pool)
    assert b.db is not None
    return SqliteModelStorage(b.db)


async def test_versions_are_numbered_in_order_and_kept_with_their_bytes(
    storage_backend: Backend,
) -> None:
    s = storage_of(storage_backend)
    assert await s.versions() == []
    assert await s.promoted() is None
    blob = bytes(range(256)) * 40  # any bytes, NULs included, survive
    assert await s.add('{"a": 1}', blob, 10) == 1
    assert await s.add('{"a": 2}', b"second", 20) == 2
    assert await s.versions() == [1, 2]
    assert await s.get(1) == StoredModel(1, 10, '{"a": 1}', blob)
    assert await s.meta(2) == '{"a": 2}'
    assert await s.get(3) is None
    assert await s.meta(3) is None
    assert await s.set_meta(2, '{"a": 2, "evaluation": {}}')
    assert await s.meta(2) == '{"a": 2, "evaluation": {}}'
    assert not await s.set_meta(3, "{}")
    assert await s.versions() == [1, 2]


async def test_concurrent_saves_get_distinct_numbers(storage_backend: Backend) -> None:
    s = storage_of(storage_backend)
    numbers = await asyncio.gather(*(s.add("{}", bytes([i]), i) for i in range(6)))
    assert sorted(numbers) == [1, 2, 3, 4, 5, 6]
    for version in numbers:
        stored = await s.get(version)
        assert stored is not None
        assert stored.model == bytes([stored.create_us])


async def test_the_promoted_pointer_names_a_saved_version(storage_backend: Backend) -> None:
    s = storage_of(storage_backend)
    assert not await s.promote(1, "{}", 5)  # nothing saved yet: nothing promoted
    assert await s.promoted() is None
    await s.add("{}", b"one", 1)
    await s.add("{}", b"two", 2)
    assert await s.promote(2, '{"better": true}', 30)
    assert await s.promoted() == Promoted(2, 30, '{"better": true}')
    # Back to an older version (a rollback), then the same one again later.
    assert await s.promote(1, "{}", 40)
    assert await s.promoted() == Promoted(1, 40, "{}")
    assert await s.promote(1, "{}", 50)
    assert await s.promoted() == Promoted(1, 50, "{}")
    assert not await s.promote(9, "{}", 60)
    assert await s.promoted() == Promoted(1, 50, "{}")
    assert await storage_backend.scalar("SELECT count(*) FROM nudge_model_promoted") == 1


async def test_an_import_keeps_its_numbers_and_happens_only_into_an_empty_registry(
    storage_backend: Backend,
) -> None:
    s = storage_of(storage_backend)
    old = [StoredModel(3, 100, '{"v": 3}', b"three"), StoredModel(5, 200, '{"v": 5}', b"five")]
    # Two servers finding the same folder at once: one imports, the other finds it done.
    done = await asyncio.gather(
        s.import_models(old, Promoted(3, 300, "{}")), s.import_models(old, Promoted(3, 300, "{}"))
    )
    assert sorted(done) == [False, True]
    assert await s.versions() == [3, 5]
    assert await s.get(5) == old[1]
    assert await s.promoted() == Promoted(3, 300, "{}")
    assert await s.add("{}", b"next", 400) == 6  # numbering goes on after the imported ones
    assert not await s.import_models([StoredModel(1, 1, "{}", b"x")], None)
    assert await s.versions() == [3, 5, 6]

"""The model registry in the database, on both backends: save, evaluate, promote, notice a
promotion, load; and the one-time import of an earlier release's model folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from pulsesync.server.app import running_server
from pulsesync.server.clock import FakeClock
from pulsesync.server.config import NudgeConfig, ServerConfig
from pulsesync.server.nudges.catalog import load_catalog
from pulsesync.server.nudges.model import LoggedDecision, OutcomeModel, meta_json, train
from pulsesync.server.nudges.policy import randomized
from pulsesync.server.nudges.registry import (
    ModelFolderError,
    ModelNotFound,
    ModelRegistry,
    decode_parts,
)
from pulsesync.server.storage.models import ModelStorage
from pulsesync.server.storage.postgres.models import PostgresModelStorage
from pulsesync.server.storage.sqlite.models import SqliteModelStorage
from tests.support.postgres import postgres_database
from tests.support.storage_backends import Backend, backend_server, storage_backend

__all__ = ["backend_server", "postgres_database", "storage_backend"]

ACTIONS = load_catalog().actions


def small_model(seed: int = 1) -> tuple[OutcomeModel, list[LoggedDecision]]:
    """A model trained on a randomized log where walking adds 300 steps after an hour sitting."""
    rng = random.Random(seed)
    data = []
    for u in range(1, 5):
        for i in range(150):
            sed = rng.uniform(0, 120)
            probs = randomized(["none", "walking_suggestion"], 0.6)
            chosen = "walking_suggestion" if rng.random() < 0.6 else "none"
            y = rng.gauss(200, 50) + (300 if chosen != "none" and sed > 60 else 0)
            data.append(
                LoggedDecision(u, i, {"sedentary_min": sed}, {}, probs, chosen, probs[chosen], y)
            )
    return train(data, ACTIONS, "candidate"), data


def storage_of(b: Backend) -> ModelStorage:
    if b.pool is not None:
        return PostgresModelStorage(b.pool)
    assert b.db is not None
    return SqliteModelStorage(b.db)


async def test_save_promote_notice_and_load(storage_backend: Backend) -> None:
    clock = FakeClock()
    reg = ModelRegistry(storage_of(storage_backend), clock)
    other = ModelRegistry(storage_of(storage_backend))  # another server over the same database
    model, data = small_model()
    assert not await other.changed()  # nothing promoted
    v = await reg.save(model, {"trained_on": len(data)})
    assert v == 1
    assert model.version == "model-v0001"
    meta = await reg.meta(v)
    assert meta["version"] == "model-v0001"
    assert meta["trained_on"] == len(data)
    assert meta["actions"] == list(ACTIONS)
    assert "evaluation" not in meta
    await reg.update_meta(v, evaluation={"better": True})
    assert (await other.meta(v))["evaluation"] == {"better": True}
    assert not await other.changed()  # saved and evaluated, not promoted
    await reg.promote(v, {"better": True})
    assert await other.changed()
    assert not await other.changed()
    assert await other.current() == 1
    loaded = await other.load(1)
    assert loaded.version == "model-v0001"
    assert np.allclose(
        loaded.predict_many(data[:40], ACTIONS), model.predict_many(data[:40], ACTIONS)
    )
    # Promoting it again (later) is a change too, as rewriting current.json was.
    clock.advance(1)
    await reg.promote(v, {"better": True})
    assert await other.changed()
    # The boosters are stored compressed: a fraction of their text.
    stored = await storage_of(storage_backend).get(1)
    assert stored is not None
    text = sum(len(p) for p in decode_parts(stored.model).values())
    assert len(stored.model) < text / 2, (len(stored.model), text)


async def test_unknown_versions_are_refused(storage_backend: Backend) -> None:
    reg = ModelRegistry(storage_of(storage_backend))
    with pytest.raises(ModelNotFound, match="no model version 4"):
        await reg.meta(4)
    with pytest.raises(ModelNotFound):
        await reg.load(4)
    with pytest.raises(ModelNotFound):
        await reg.promote(4, {})
    with pytest.raises(ModelNotFound):
        await reg.update_meta(4, evaluation={})
    assert await reg.current() is None


def write_old_folder(root: Path, models: dict[int, OutcomeModel], promoted: int | None) -> None:
    """A model folder as the earlier release wrote it (registry.py, before the database)."""
    root.mkdir(parents=True)
    for version, model in models.items():
        stem = f"model-v{version:04d}"
        model.version = stem
        for part, text in model.parts().items():
            (root / f"{stem}.{part}.txt").write_text(text)
        (root / f"{stem}.json").write_text(meta_json(model, {"trained_on": 600 + version}))
    if promoted is not None:
        (root / "current.json").write_text(
            json.dumps({"version": promoted, "evaluation": {"better": True}})
        )


async def test_an_earlier_releases_model_folder_is_imported_once(
    storage_backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m2, data = small_model(2)
    m3, _ = small_model(3)
    folder = tmp_path / "nudge_models"
    write_old_folder(folder, {2: m2, 3: m3}, promoted=2)
    reg = ModelRegistry(storage_of(storage_backend))
    assert await reg.import_folder(folder) == [2, 3]
    assert await reg.versions() == [2, 3]
    assert await reg.current() == 2
    assert (await reg.meta(3))["trained_on"] == 603
    loaded = await reg.load(2)
    assert np.allclose(loaded.predict_many(data[:40], ACTIONS), m2.predict_many(data[:40], ACTIONS))
    # Once: the next start (or another server given the same folder) imports nothing, says the
    # folder is no longer read, and training goes on from the imported numbers.
    assert await ModelRegistry(storage_of(storage_backend)).import_folder(folder) == []
    assert "can be removed" in caplog.text
    assert await reg.save(m3, {}) == 4
    # No folder, or one without models: nothing to do.
    assert await reg.import_folder(tmp_path / "none") == []


async def test_a_damaged_model_folder_stops_the_import_with_the_reason(
    storage_backend: Backend, tmp_path: Path
) -> None:
    model, _ = small_model()
    folder = tmp_path / "nudge_models"
    write_old_folder(folder, {1: model}, promoted=1)
    (folder / "model-v0001.base.txt").write_text("not a LightGBM model")
    reg = ModelRegistry(storage_of(storage_backend))
    with pytest.raises(ModelFolderError, match="cannot import the nudge models of"):
        await reg.import_folder(folder)
    assert await reg.versions() == []  # nothing half-imported
    (folder / "model-v0001.base.txt").unlink()
    with pytest.raises(ModelFolderError, match=r"model-v0001\.base\.txt is missing"):
        await reg.import_folder(folder)


async def test_a_server_started_over_an_earlier_releases_folder_imports_it_and_decides_with_it(
    tmp_path: Path,
) -> None:
    model, data = small_model()
    write_old_folder(tmp_path / "nudge_models", {1: model}, promoted=1)
    config = ServerConfig(port=0, data_dir=tmp_path, nudges=NudgeConfig(scheduler="manual"))
    async with running_server(config) as server:
        engine = server.app.nudges
        assert await engine.registry.current() == 1
        await engine.tick()
        assert engine.model is not None
        assert engine.model.version == "model-v0001"
        assert np.allclose(
            engine.model.predict_many(data[:40], ACTIONS), model.predict_many(data[:40], ACTIONS)
        )

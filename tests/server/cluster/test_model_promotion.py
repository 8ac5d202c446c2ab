"""A nudge model promoted anywhere is the one every replica decides with.

Two servers over one PostgreSQL, each with a data directory of its own (as replicas on
different machines have): a model saved and promoted through one server's registry is loaded
by the other at its next tick, and so is a later one promoted by `pulsesync nudges promote`, a
process with a third data directory. Neither server has a model folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
from pathlib import Path

import numpy as np
import pytest

from pulsesync.server.app import running_server
from pulsesync.server.config import NudgeConfig, ServerConfig
from pulsesync.server.privacy.keys import RECEIPT_KEY_ENV
from pulsesync.server.profiles.crypto import KEK_ENV, FileKeyStore
from pulsesync.server.storage.database_url import parse_database
from tests.server.nudges.test_registry import ACTIONS, small_model
from tests.support.postgres import postgres_database, postgres_dsn

__all__ = ["postgres_database", "postgres_dsn"]


@pytest.fixture(autouse=True)
def shared_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEK_ENV, FileKeyStore.create(tmp_path / "kek.key").path.read_text())
    monkeypatch.setenv(RECEIPT_KEY_ENV, secrets.token_hex(32))


async def test_a_model_promoted_on_one_replica_or_by_the_command_is_used_by_another(
    tmp_path: Path, postgres_dsn: str
) -> None:
    def config(name: str) -> ServerConfig:
        return ServerConfig(
            port=0,
            data_dir=tmp_path / name,
            grace_seconds=0.5,
            database_url=parse_database(postgres_dsn),
            nudges=NudgeConfig(scheduler="manual"),  # ticked here, one at a time
        )

    first, data = small_model(1)
    second, _ = small_model(2)
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(running_server(config("a")))
        b = await stack.enter_async_context(running_server(config("b")))
        await b.app.nudges.tick()
        assert b.app.nudges.model is None  # nothing promoted: the randomized cold start

        # Trained and promoted through replica a's registry.
        registry = a.app.nudges.registry
        v1 = await registry.save(first, {"trained_on": len(data)})
        await registry.promote(v1, {"better": True})
        await b.app.nudges.tick()
        model = b.app.nudges.model
        assert model is not None
        assert model.version == "model-v0001"
        assert np.allclose(
            model.predict_many(data[:40], ACTIONS), first.predict_many(data[:40], ACTIONS)
        )

        # A second version, evaluated better, promoted by the command in another process.
        v2 = await registry.save(second, {"trained_on": len(data)})
        await registry.update_meta(
            v2,
            evaluation={"against": "model-v0001", "decisions": 600, "better": True, "reason": ""},
        )
        await b.app.nudges.tick()
        assert b.app.nudges.model is model  # saved, not promoted: nothing reloaded
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pulsesync.server.cli", "nudges", "promote", "-v", str(v2),
            "--database", postgres_dsn, "--data-dir", str(tmp_path / "cli"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ),
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        assert "promoted model-v0002" in out.decode()
        for replica in (b, a):
            await replica.app.nudges.tick()
            reloaded = replica.app.nudges.model
            assert reloaded is not None
            assert reloaded.version == "model-v0002"
            assert np.allclose(
                reloaded.predict_many(data[:40], ACTIONS), second.predict_many(data[:40], ACTIONS)
            )
    for name in ("a", "b", "cli"):
        assert not (tmp_path / name / "nudge_models").exists()

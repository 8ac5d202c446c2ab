"""`pulsesync serve --database postgresql://...` and the admin CLI on PostgreSQL, as processes.

A user and a pairing code made by the admin commands, then a device paired through the served
API: all three processes share only the PostgreSQL database named by --database. The nudge
learning loop (`nudges import-log|train|evaluate|promote|status`) and `keys rotate` with the key
vault in a PostgreSQL database of its own run the same way, each command its own process.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import grpc

from pulsesync.server.clock import SystemClock
from pulsesync.server.compose import open_storage_profile_store
from pulsesync.server.config import ServerConfig
from pulsesync.server.identity import IdentityStore
from pulsesync.server.profiles.crypto import FileKeyStore
from pulsesync.server.profiles.store import ProfileStore
from pulsesync.server.storage.backend import open_storage
from pulsesync.server.storage.database_url import parse_database
from pulsesync.server.storage.postgres.keys import PostgresKeyVault
from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.v1 import common_pb2, devices_pb2, devices_pb2_grpc
from tests.server.nudges.test_importlog import trial_jsonl
from tests.support.postgres import fresh_schema, postgres_database, postgres_dsn
from tests.support.serve import ServeProcess

__all__ = ["postgres_database", "postgres_dsn"]


async def _cli(*args: str, env: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pulsesync.server.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # A connection left open at exit (e.g. the key vault's) is reported, and fails the test.
        env={**os.environ, "PYTHONWARNINGS": "always::ResourceWarning", **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    assert "ResourceWarning" not in err.decode(), err.decode()
    return proc.returncode, out.decode(), err.decode()


async def test_serve_and_admin_commands_share_a_postgresql_database(
    tmp_path: Path, postgres_dsn: str
) -> None:
    where = ["--database", postgres_dsn, "--data-dir", str(tmp_path)]
    assert (await _cli("users", "add", "ada", *where))[0] == 0
    rc, _, err = await _cli("users", "add", "ada", *where)
    assert rc == 1
    assert "already exists" in err
    rc, out, err = await _cli("devices", "pair-code", "ada", *where)
    assert rc == 0, err
    code = out.strip()

    server = ServeProcess("serve", tmp_path)
    try:
        await server.start(where)
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = devices_pb2_grpc.DeviceServiceStub(ch)
            paired = await stub.PairDevice(
                devices_pb2.PairDeviceRequest(
                    pairing_code=code, device_name="phone", kind=common_pb2.DEVICE_KIND_PHONE
                ),
                timeout=30,
            )
            listed = await stub.ListDevices(
                devices_pb2.ListDevicesRequest(),
                metadata=(("authorization", f"Bearer {paired.token}"),),
                timeout=30,
            )
        assert [d.device_id for d in listed.devices] == [paired.device.device_id]
        assert await server.stop() == 0, server.log()
    finally:
        await server.kill()
    assert '"message": "serving"' in server.log()
    # Nothing was stored in a SQLite file beside the PostgreSQL database.
    assert not (tmp_path / "pulsesync.db").exists()


async def test_the_nudge_learning_loop_runs_on_a_postgresql_database(
    tmp_path: Path, postgres_dsn: str
) -> None:
    models = ["--data-dir", str(tmp_path)]
    log = trial_jsonl(tmp_path / "trial.jsonl", 12, 40, 5)
    # PULSESYNC_DATABASE names the database as --database does.
    rc, out, err = await _cli(
        "nudges", "import-log", str(log), *models, env={"PULSESYNC_DATABASE": postgres_dsn}
    )
    assert rc == 0, err
    assert "imported 2400 decisions of 12 people" in out
    where = ["--database", postgres_dsn, *models]
    rc, out, err = await _cli("nudges", "train", *where)
    assert rc == 0, err
    assert "trained on 2400 decisions" in out
    rc, out, err = await _cli("nudges", "evaluate", *where)
    assert rc == 0, err
    assert "  NET " in out
    assert "verdict:" in out
    rc, out, err = await _cli("nudges", "promote", *where)
    assert rc in (0, 2), err  # promoted, or kept by the gate: either way the evaluation was read
    rc, out, err = await _cli("nudges", "status", "--json", *where)
    assert rc == 0, err
    status = json.loads(out.strip().splitlines()[-1])
    assert status["versions"] == [1]
    # The decisions were stored in PostgreSQL, and nothing in a SQLite file beside it.
    async with await PostgresPool.open(postgres_dsn, max_size=1) as pool:
        assert await pool.fetchval("SELECT count(*) FROM imported_decisions") == 2400
    assert not (tmp_path / "pulsesync.db").exists()


@asynccontextmanager
async def _profiles(config: ServerConfig) -> AsyncIterator[tuple[IdentityStore, ProfileStore]]:
    """The identity and profile stores a server would open with this configuration."""
    closers: list[Callable[[], Awaitable[None]]] = []
    async with open_storage(config.store) as storage:
        try:
            store = await open_storage_profile_store(
                config, storage, SystemClock(), closers=closers
            )
            yield IdentityStore(storage.identity, SystemClock()), store
        finally:
            for close in closers:
                await close()


async def test_keys_rotate_with_the_key_vault_in_postgresql(
    tmp_path: Path, postgres_dsn: str, postgres_database: str
) -> None:
    async with fresh_schema(postgres_database) as vault_dsn:  # the vault's own database
        config = ServerConfig(
            data_dir=tmp_path,
            database_url=parse_database(postgres_dsn),
            key_vault=parse_database(vault_dsn),
        )
        async with _profiles(config) as (identity, profiles):
            user_id = await identity.add_user("ada")
            await profiles.edit(user_id, lambda p: setattr(p, "time_zone", "UTC"))
        kek_file = tmp_path / "kek.key"
        first = FileKeyStore.load(kek_file).primary_id
        where = ["--database", postgres_dsn, "--key-vault", vault_dsn, "--data-dir", str(tmp_path)]
        rc, out, err = await _cli("keys", "rotate", *where)
        assert rc == 0, err
        assert f"re-wrapped 1 profile data key(s) in {vault_dsn}" in out
        assert f"removed retired key(s) {first}" in out
        second = FileKeyStore.load(kek_file).primary_id
        assert second != first
        assert kek_file.stat().st_mode & 0o777 == 0o600
        async with await PostgresKeyVault.open(parse_database(vault_dsn)) as vault:
            assert await vault.kek_counts() == {second: 1}
        # Again, named by the environment this time.
        rc, out, err = await _cli(
            "keys",
            "rotate",
            "--data-dir",
            str(tmp_path),
            env={"PULSESYNC_DATABASE": postgres_dsn, "PULSESYNC_KEY_VAULT": vault_dsn},
        )
        assert rc == 0, err
        assert "re-wrapped 1 profile data key(s)" in out
        # Every stored version stays readable under the rotated keys.
        async with _profiles(config) as (_, profiles):
            assert (await profiles.get_version(user_id, 1)).time_zone == "UTC"
        # A vault other than the one the profiles were sealed under is refused before the
        # key file is touched.
        keys_before = kek_file.read_bytes()
        async with fresh_schema(postgres_database) as other_dsn:
            rc, out, err = await _cli(
                "keys", "rotate", *where[:2], "--key-vault", other_dsn, *where[4:]
            )
        assert rc != 0
        assert f"{other_dsn} is another vault" in err, err
        assert kek_file.read_bytes() == keys_before
        # The privacy commands open the same vault: erasure destroys the person's key there.
        rc, out, err = await _cli("privacy", "erase", "ada", "--yes", *where)
        assert rc == 0, err
        async with await PostgresKeyVault.open(parse_database(vault_dsn)) as vault:
            assert await vault.kek_counts() == {}

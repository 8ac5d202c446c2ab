"""A real server on 127.0.0.1 port 0 over a real SQLite file or PostgreSQL, and helpers to pair
devices and read what the server stored on either backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from pulsesync.server.app import RunningServer, running_server
from pulsesync.server.clock import Clock
from pulsesync.server.config import ServerConfig
from pulsesync.server.errors import NotFound
from pulsesync.server.privacy.consent import CATEGORIES
from pulsesync.server.storage.database_url import parse_database
from pulsesync.v1 import common_pb2, devices_pb2, devices_pb2_grpc


@dataclass(frozen=True, slots=True)
class PairedDevice:
    """A device paired for a user: its id, token and a channel with its credentials."""

    user: str
    device_id: str
    token: str
    kind: int

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)


@asynccontextmanager
async def start_server(
    tmp: Path,
    *,
    clock: Clock | None = None,
    database: str | None = None,
    read_database: str | None = None,
) -> AsyncIterator[RunningServer]:
    """A server bound to 127.0.0.1:0 with its files under tmp; its database is the SQLite file
    there, or `database` (a postgresql:// DSN, e.g. the postgres_dsn fixture's), with timeline
    reads from `read_database` when given."""
    config = ServerConfig(
        port=0,
        data_dir=tmp,
        grace_seconds=0.5,
        database_url=parse_database(database) if database else None,
        read_database=parse_database(read_database) if read_database else None,
    )
    async with running_server(config, clock=clock) as server:
        yield server


async def stored_rows(server: RunningServer, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """The rows of a read query on the server's database, written with `?` placeholders (the
    SQL both backends share), each value as Python reads it (bytes for a blob)."""
    db = server.app.sqlite
    if db is not None:
        async with db.reader.execute(sql, args) as c:
            return [tuple(r) for r in await c.fetchall()]
    pool = server.app.storage.pool
    assert pool is not None
    parts = sql.split("?")
    numbered = parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], start=1))
    return [tuple(r) for r in await pool.fetch(numbered, *args)]


@pytest.fixture(params=["sqlite", "postgres"])
def server_database(request: pytest.FixtureRequest) -> str | None:
    """For start_server's `database`, once per backend: None (the SQLite file), then the DSN of
    a fresh PostgreSQL schema. A test module using it imports the fixtures of
    tests/support/postgres.py (postgres_database, postgres_dsn)."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_dsn"))


ALL_CONSENTS = tuple(CATEGORIES)


async def pair_device(
    server: RunningServer,
    user: str,
    *,
    kind: int = common_pb2.DEVICE_KIND_PHONE,
    name: str = "",
    consents: tuple[int, ...] = ALL_CONSENTS,
) -> PairedDevice:
    """Create the user if needed (granting `consents`), mint a code and pair a device
    through the real PairDevice RPC."""
    ids = server.app.identity
    try:
        user_id = await ids.user_id_by_name(user)
    except NotFound:
        user_id = await ids.add_user(user)
        for category in consents:
            await server.app.consent.set(user_id, category, True, device_id="test-setup")
    code, _ = await ids.create_pairing_code(user_id)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = devices_pb2_grpc.DeviceServiceStub(channel)
        resp = await stub.PairDevice(
            devices_pb2.PairDeviceRequest(
                pairing_code=code,
                device_name=name or f"{user}-{kind}",
                kind=kind,  # type: ignore[arg-type]
            ),
            timeout=5,
        )
    return PairedDevice(user, resp.device.device_id, resp.token, kind)

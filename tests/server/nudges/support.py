"""Helpers: a server whose nudge engine ticks when the test says, store events as ingest does
(insert, then publish on the bus), build events, a model registry in a SQLite database of its
own, a loopback push gateway, and registering a device's push target over gRPC."""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from pulsesync.kinds import kind_of
from pulsesync.server.app import RunningServer, running_server
from pulsesync.server.bus import CommittedEvent
from pulsesync.server.clock import FakeClock
from pulsesync.server.config import NudgeConfig, ServerConfig
from pulsesync.server.nudges.registry import ModelRegistry
from pulsesync.server.storage.db import Database
from pulsesync.server.storage.sqlite.models import SqliteModelStorage
from pulsesync.v1 import events_pb2, nudges_pb2, nudges_pb2_grpc
from tests.support.server import PairedDevice

_seq: dict[int, int] = {}


@asynccontextmanager
async def manual_nudge_server(
    folder: Path, start_us: int, seed: int = 1, catalog: Path | None = None
) -> AsyncIterator[tuple[RunningServer, FakeClock]]:
    """A server on a fake clock from start_us whose nudge engine ticks only when told."""
    clock = FakeClock(start_us)
    config = ServerConfig(port=0, data_dir=folder, grace_seconds=0.5,
                          nudges=NudgeConfig(scheduler="manual", seed=seed, catalog=catalog))  # fmt: skip
    async with running_server(config, clock=clock) as server:
        yield server, clock


def steps_event(t_us: int, count: int, sensor: str = "watch") -> events_pb2.Event:
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(t_us)
    return events_pb2.Event(
        event_id=str(uuid.uuid4()),
        device_time=ts,
        steps=events_pb2.Steps(
            sensor_id=sensor, count=count, interval=duration_pb2.Duration(seconds=60)
        ),
    )


def app_event(t_us: int, app: str, feature: str = "main") -> events_pb2.Event:
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(t_us)
    return events_pb2.Event(
        event_id=str(uuid.uuid4()),
        device_time=ts,
        feature_use=events_pb2.FeatureUse(app=app, feature=feature),
    )


async def device_pk_of(server: RunningServer, device_id: str) -> tuple[int, int]:
    async with server.app.db.reader.execute(
        "SELECT device_pk, user_id FROM devices WHERE device_id = ?", (device_id,)
    ) as cur:
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def store(server: RunningServer, device_id: str, events: Sequence[events_pb2.Event]) -> None:
    """Commit events for a device at their device_time (no skew) and publish them."""
    device_pk, user_id = await device_pk_of(server, device_id)
    committed = []
    async with server.app.db.transaction() as tx:
        for ev in events:
            seq = _seq.get(device_pk, 0) + 1
            _seq[device_pk] = seq
            ev.seq = seq
            t_us = ev.device_time.ToMicroseconds()
            body = ev.SerializeToString()
            await tx.execute(
                "INSERT INTO events (device_pk, seq, user_id, t_us, kind, received_us, body) VALUES (?,?,?,?,?,?,?)",
                (device_pk, seq, user_id, t_us, kind_of(ev), t_us, body),
            )
            committed.append(CommittedEvent(user_id, device_pk, seq, t_us, kind_of(ev), body))
    server.app.bus.publish(user_id, committed)


@asynccontextmanager
async def sqlite_registry(folder: Path) -> AsyncIterator[ModelRegistry]:
    """A model registry in a fresh SQLite database in folder."""
    async with await Database.open(folder / "models.db") as db:
        yield ModelRegistry(SqliteModelStorage(db))


class PushReceiver:
    """A loopback push gateway: answers 503 to the first `fail` POSTs, then 200."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.posts: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(503 if len(outer.posts) <= outer.fail else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/push"


@contextmanager
def push_receiver(fail: int = 0) -> Iterator[PushReceiver]:
    """A PushReceiver serving on a thread until the block ends."""
    r = PushReceiver(fail)
    thread = threading.Thread(target=r.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()
        thread.join()


async def register_push_target(
    address: str, device: PairedDevice, push_token: str, deadline_s: float = 10
) -> None:
    """RegisterPushTarget for device on the server at address (an empty token removes it);
    deadline_s: the call's gRPC deadline."""
    async with grpc.aio.insecure_channel(address) as ch:
        await nudges_pb2_grpc.NudgeServiceStub(ch).RegisterPushTarget(
            nudges_pb2.RegisterPushTargetRequest(push_token=push_token),
            metadata=device.metadata,
            timeout=deadline_s,
        )

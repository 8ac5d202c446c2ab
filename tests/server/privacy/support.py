"""Seeding stored data for privacy tests (rows as ingest writes them, per 0001_core.sql)."""

from __future__ import annotations

import uuid
from pathlib import Path

from google.protobuf import duration_pb2, timestamp_pb2

from pulsesync.kinds import kind_of
from pulsesync.server.app import RunningServer
from pulsesync.v1 import events_pb2


def search(query: str, seq: int, t_us: int) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=str(uuid.uuid4()),
        seq=seq,
        device_time=timestamp_pb2.Timestamp(seconds=t_us // 1_000_000),
        search=events_pb2.Search(app="notes", query=query, result_count=3),
    )


def heart_rate(sensor: str, bpm: int, seq: int, t_us: int) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=str(uuid.uuid4()),
        seq=seq,
        device_time=timestamp_pb2.Timestamp(seconds=t_us // 1_000_000),
        heart_rate=events_pb2.HeartRate(sensor_id=sensor, bpm=bpm, rr_intervals_ms=[812.5, 790.0]),
    )


def feature_use(feature: str, seq: int, t_us: int) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=str(uuid.uuid4()),
        seq=seq,
        device_time=timestamp_pb2.Timestamp(seconds=t_us // 1_000_000),
        feature_use=events_pb2.FeatureUse(
            app="notes", feature=feature, duration=duration_pb2.Duration(seconds=42)
        ),
    )


async def device_pk(server: RunningServer, device_id: str) -> int:
    async with server.app.db.reader.execute(
        "SELECT device_pk FROM devices WHERE device_id = ?", (device_id,)
    ) as c:
        row = await c.fetchone()
    assert row is not None
    return int(row[0])


async def user_id(server: RunningServer, name: str) -> int:
    return await server.app.identity.user_id_by_name(name)


async def store_events(
    server: RunningServer, device_id: str, events: list[tuple[int, events_pb2.Event]]
) -> None:
    """Write (t_us, event) pairs as stored events of the device."""
    pk = await device_pk(server, device_id)
    async with server.app.db.reader.execute(
        "SELECT user_id FROM devices WHERE device_pk = ?", (pk,)
    ) as c:
        row = await c.fetchone()
    assert row is not None
    uid = int(row[0])
    async with server.app.db.transaction() as tx:
        await tx.executemany(
            "INSERT INTO events (device_pk, seq, user_id, t_us, kind, received_us, body)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(pk, e.seq, uid, t, kind_of(e), t, e.SerializeToString()) for t, e in events],
        )


async def quarantine(
    server: RunningServer, device_id: str, body: bytes, seq: int, t_us: int, detail: str
) -> None:
    pk = await device_pk(server, device_id)
    async with server.app.db.reader.execute(
        "SELECT user_id FROM devices WHERE device_pk = ?", (pk,)
    ) as c:
        row = await c.fetchone()
    assert row is not None
    async with server.app.db.transaction() as tx:
        await tx.execute(
            "INSERT INTO quarantine (user_id, device_pk, seq, event_id, reason, detail, received_us, body)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (int(row[0]), pk, seq, str(uuid.uuid4()), "INVALID", detail, t_us, body),
        )


def database_bytes(db_path: Path) -> bytes:
    """The database file and its WAL and shared-memory files, concatenated."""
    out = b""
    for suffix in ("", "-wal", "-shm", "-journal"):
        p = Path(str(db_path) + suffix)
        if p.exists():
            out += p.read_bytes()
    return out

#!/usr/bin/env python3
"""Ingest on PostgreSQL: the ingest writer against a raw binary COPY floor, same table, same run.

In a scratch database migrated with the product's PostgreSQL schema, AGENTS devices each send
500-event batches (realistic serialized events) to a `PostgresEventWriter`, keeping WINDOW
batches in flight as an agent does while it waits for acks; the rate counts events acked (so
committed). The floor is the same rows written by a bare binary COPY into the same events
table, FLOOR_TX_ROWS rows per transaction on as many connections as the writer has workers
(DEFAULT_WORKERS), nothing else (no device locks, no dedupe, no
watermark, no change feed). Runs alternate (floor, writer) ROUNDS times, each on an emptied
table after a CHECKPOINT, so both see the same machine noise; medians are reported.

    python scripts/bench_scale.py [--dsn postgresql://postgres@127.0.0.1:5432/test]
                                  [--events 100000] [--rounds 3]

`vs_copy_floor` is the writer's rate over the floor's (goal >= 0.4). `cpu_us_per_event_postgres`
is this process's CPU per event in the writer runs (the replica's side; PostgreSQL's own work
is not in it). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from typing import Any, Final

import asyncpg

from pulsesync.server.storage.postgres.events import DEFAULT_WORKERS, PostgresEventWriter
from pulsesync.server.storage.postgres.migrate import migrate
from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.server.timeline.committer import Batch, EventRow
from pulsesync.v1 import events_pb2

DEFAULT_DSN: Final = os.environ.get(
    "PULSESYNC_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
AGENTS: Final = 8
BATCH_EVENTS: Final = 500
WINDOW: Final = 4
FLOOR_TX_ROWS: Final = 10_000
COLUMNS: Final = ("user_id", "device_pk", "seq", "t_us", "kind", "body", "received_us")


def make_rows(user_id: int, device_pk: int, n: int, now_us: int) -> list[EventRow]:
    """A realistic mix: mostly heart rate with RR intervals, some steps and screen views."""
    rows: list[EventRow] = []
    for seq in range(1, n + 1):
        e = events_pb2.Event(event_id=str(uuid.uuid4()), seq=seq)
        t = now_us - 3_600_000_000 + seq * 1000
        e.device_time.seconds, e.device_time.nanos = t // 1_000_000, (t % 1_000_000) * 1000
        if seq % 10 < 7:
            e.heart_rate.sensor_id = "C4:7C:8D:6A:1F:02"
            e.heart_rate.bpm = 60 + seq % 60
            e.heart_rate.rr_intervals_ms.extend([812.5, 798.8])
            kind = events_pb2.EVENT_KIND_HEART_RATE
        elif seq % 10 < 9:
            e.steps.sensor_id = "phone"
            e.steps.count = 12
            kind = events_pb2.EVENT_KIND_STEPS
        else:
            e.screen_view.app = "reader"
            e.screen_view.screen = "chapter"
            kind = events_pb2.EVENT_KIND_SCREEN_VIEW
        rows.append((user_id, device_pk, seq, t, kind, e.SerializeToString(), now_us))
    return rows


async def reset(conn: asyncpg.Connection) -> None:
    await conn.execute("TRUNCATE events, event_changes, timeline_heads, quarantine")
    await conn.execute("UPDATE devices SET ack_watermark = 0")
    await conn.execute("CHECKPOINT")


async def floor_run(conns: list[asyncpg.Connection], rows: list[EventRow]) -> float:
    """Bare COPY on as many connections as the writer has workers, rows split between them."""

    async def copy(conn: asyncpg.Connection, part: list[EventRow]) -> None:
        for i in range(0, len(part), FLOOR_TX_ROWS):
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "events", records=part[i : i + FLOOR_TX_ROWS], columns=COLUMNS
                )

    n = len(conns)
    t0 = time.perf_counter()
    await asyncio.gather(*(copy(c, rows[k::n]) for k, c in enumerate(conns)))
    return time.perf_counter() - t0


async def writer_run(
    pool: PostgresPool, per_device: dict[tuple[int, int], list[EventRow]], now_us: int
) -> tuple[float, float, int]:
    writer = PostgresEventWriter(pool)
    await writer.start()

    async def agent(rows: list[EventRow]) -> None:
        inflight: list[asyncio.Future[Any]] = []
        for i in range(0, len(rows), BATCH_EVENTS):
            chunk = rows[i : i + BATCH_EVENTS]
            b = Batch(chunk[0][1], chunk[0][0], now_us, chunk, [], True, None)
            inflight.append(writer.submit(b))
            if len(inflight) >= WINDOW:
                await inflight.pop(0)
        for f in inflight:
            await f

    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(agent(rows) for rows in per_device.values()))
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    commits = writer.commits
    await writer.stop()
    return dt, dc, commits


async def main(dsn: str, n_events: int, rounds: int) -> dict[str, Any]:
    scratch = f"pulsesync_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f'CREATE DATABASE "{scratch}"')
    target = f"{dsn.rpartition('/')[0]}/{scratch}"
    floor_rates: list[float] = []
    writer_rates: list[float] = []
    cpu: list[float] = []
    per_commit: list[float] = []
    try:
        pool = await PostgresPool.open(target, max_size=4)
        conn = await asyncpg.connect(target)
        floor_conns = [await asyncpg.connect(target) for _ in range(DEFAULT_WORKERS)]
        try:
            await migrate(pool)
            now_us = time.time_ns() // 1000
            per_device: dict[tuple[int, int], list[EventRow]] = {}
            per_agent = n_events // AGENTS
            for i in range(AGENTS):
                user_id = await conn.fetchval(
                    "INSERT INTO users (name, create_us) VALUES ($1, 0) RETURNING user_id",
                    f"u{i}",
                )
                device_pk = await conn.fetchval(
                    "INSERT INTO devices (user_id, device_id, name, kind, token_hash, pair_us)"
                    " VALUES ($1, $2, 'phone', 1, $3, 0) RETURNING device_pk",
                    user_id,
                    f"dev_{i}",
                    os.urandom(32),
                )
                per_device[(user_id, device_pk)] = make_rows(user_id, device_pk, per_agent, now_us)
            all_rows = [r for rows in per_device.values() for r in rows]
            total = len(all_rows)
            for rnd in range(rounds):
                await reset(conn)
                dt = await floor_run(floor_conns, all_rows)
                floor_rates.append(total / dt)
                await reset(conn)
                dt, dc, commits = await writer_run(pool, per_device, now_us)
                stored = await conn.fetchval("SELECT count(*) FROM events")
                if stored != total:
                    raise RuntimeError(f"the writer stored {stored} events of {total}")
                writer_rates.append(total / dt)
                cpu.append(dc * 1e6 / total)
                per_commit.append(total / max(commits, 1))
                print(
                    f"round {rnd + 1}: floor {floor_rates[-1]:9.0f} ev/s, writer"
                    f" {writer_rates[-1]:9.0f} ev/s ({writer_rates[-1] / floor_rates[-1]:.2f}),"
                    f" {cpu[-1]:.2f} CPU us/event, {per_commit[-1]:.0f} events/commit",
                    file=sys.stderr,
                )
        finally:
            for c in [conn, *floor_conns]:
                await c.close()
            await pool.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
        await admin.close()
    ratios = [w / f for w, f in zip(writer_rates, floor_rates, strict=True)]
    return {
        "events": total,
        "agents": AGENTS,
        "batch_events": BATCH_EVENTS,
        "rounds": rounds,
        "copy_floor_events_per_s": round(statistics.median(floor_rates)),
        "postgres_writer_events_per_s": round(statistics.median(writer_rates)),
        "vs_copy_floor": round(statistics.median(ratios), 3),
        "goal_vs_copy_floor": 0.4,
        "cpu_us_per_event_postgres": round(statistics.median(cpu), 2),
        "events_per_commit": round(statistics.median(per_commit)),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="a server and a database to connect to")
    parser.add_argument("--events", type=int, default=100_000, help="events per run")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of runs (floor, writer)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.dsn, args.events, args.rounds))))

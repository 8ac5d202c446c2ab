#!/usr/bin/env python3
"""PostgreSQL driver choice: bulk insert of timeline events with asyncpg and psycopg 3.

The same rows (realistic serialized events, ~60-90 bytes each) go into the events table of the
PostgreSQL schema (server/storage/postgres/migrations: primary key (user_id, device_pk, seq),
one secondary index on (user_id, t_us)) through each driver's bulk paths:

* asyncpg binary COPY (`copy_records_to_table`)
* asyncpg `executemany` of a one-row INSERT (pipelined by the driver)
* asyncpg one INSERT ... SELECT FROM unnest() of seven array parameters
* psycopg 3 binary COPY (`cursor.copy(... FORMAT BINARY)` with `write_row`)
* psycopg 3 `executemany` of a one-row INSERT (pipeline mode)

Each transaction holds TX_ROWS rows, as one ingest group does. Rounds alternate between the
methods so each sees the same machine noise; the table is truncated before every run, and the
median run of each method is reported.

    python scripts/bench_pg_driver.py [--dsn postgresql://postgres@127.0.0.1:5432/test]
                                      [--rows 60000] [--rounds 3]

The benchmark works in a scratch database it creates and drops. Ends with one JSON line.
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
from collections.abc import Awaitable, Callable
from typing import Any, Final

import asyncpg
import psycopg

from pulsesync.v1 import events_pb2

DEFAULT_DSN: Final = os.environ.get(
    "PULSESYNC_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
# Rows per transaction: what one ingest group commits at a time.
TX_ROWS: Final = 2000
USERS: Final = 50
COLUMNS: Final = ("user_id", "device_pk", "seq", "t_us", "kind", "received_us", "body")
DDL: Final = """
CREATE TABLE events (
    user_id     bigint NOT NULL,
    device_pk   bigint NOT NULL,
    seq         bigint NOT NULL,
    t_us        bigint NOT NULL,
    kind        integer NOT NULL,
    received_us bigint NOT NULL,
    body        bytea NOT NULL,
    PRIMARY KEY (user_id, device_pk, seq)
);
CREATE INDEX events_by_user_time ON events (user_id, t_us);
"""
INSERT: Final = (
    "INSERT INTO events (user_id, device_pk, seq, t_us, kind, received_us, body)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7)"
)
INSERT_PSYCOPG_ALL: Final = (
    "INSERT INTO events (user_id, device_pk, seq, t_us, kind, received_us, body)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s)"
)
INSERT_UNNEST: Final = (
    "INSERT INTO events (user_id, device_pk, seq, t_us, kind, received_us, body)"
    " SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[],"
    " $5::integer[], $6::bigint[], $7::bytea[])"
)

Row = tuple[int, int, int, int, int, int, bytes]


def make_rows(n: int) -> list[Row]:
    """A realistic mix: mostly heart rate with RR intervals, some steps and screen views."""
    now = time.time_ns() // 1000
    rows: list[Row] = []
    for i in range(n):
        user = i % USERS + 1
        seq = i // USERS + 1
        e = events_pb2.Event(event_id=str(uuid.uuid4()), seq=seq)
        t = now - 3_600_000_000 + seq * 1000
        e.device_time.seconds, e.device_time.nanos = t // 1_000_000, (t % 1_000_000) * 1000
        if i % 10 < 7:
            e.heart_rate.sensor_id = "C4:7C:8D:6A:1F:02"
            e.heart_rate.bpm = 60 + seq % 60
            e.heart_rate.rr_intervals_ms.extend([812.5, 798.8])
            kind = events_pb2.EVENT_KIND_HEART_RATE
        elif i % 10 < 9:
            e.steps.sensor_id = "phone"
            e.steps.count = 12
            kind = events_pb2.EVENT_KIND_STEPS
        else:
            e.screen_view.app = "reader"
            e.screen_view.screen = "chapter"
            kind = events_pb2.EVENT_KIND_SCREEN_VIEW
        rows.append((user, user, seq, t, kind, now, e.SerializeToString()))
    return rows


def chunks(rows: list[Row]) -> list[list[Row]]:
    return [rows[i : i + TX_ROWS] for i in range(0, len(rows), TX_ROWS)]


async def asyncpg_copy(conn: asyncpg.Connection, rows: list[Row]) -> None:
    for chunk in chunks(rows):
        async with conn.transaction():
            await conn.copy_records_to_table("events", records=chunk, columns=COLUMNS)


async def asyncpg_executemany(conn: asyncpg.Connection, rows: list[Row]) -> None:
    for chunk in chunks(rows):
        async with conn.transaction():
            await conn.executemany(INSERT, chunk)


async def asyncpg_unnest(conn: asyncpg.Connection, rows: list[Row]) -> None:
    for chunk in chunks(rows):
        async with conn.transaction():
            await conn.execute(INSERT_UNNEST, *map(list, zip(*chunk, strict=True)))


async def psycopg_copy(conn: psycopg.AsyncConnection[Any], rows: list[Row]) -> None:
    types = ["int8", "int8", "int8", "int8", "int4", "int8", "bytea"]
    for chunk in chunks(rows):
        async with (
            conn.transaction(),
            conn.cursor() as cur,
            cur.copy(f"COPY events ({', '.join(COLUMNS)}) FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types(types)
            for row in chunk:
                await copy.write_row(row)


async def psycopg_executemany(conn: psycopg.AsyncConnection[Any], rows: list[Row]) -> None:
    for chunk in chunks(rows):
        async with conn.transaction(), conn.cursor() as cur:
            await cur.executemany(INSERT_PSYCOPG_ALL, chunk)


async def main(dsn: str, n_rows: int, rounds: int) -> dict[str, Any]:
    scratch = f"pulsesync_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f'CREATE DATABASE "{scratch}"')
    base, _, _ = dsn.rpartition("/")
    target = f"{base}/{scratch}"
    try:
        apg = await asyncpg.connect(target)
        ppg = await psycopg.AsyncConnection.connect(target, autocommit=True)
        try:
            await apg.execute(DDL)
            rows = make_rows(n_rows)
            methods: dict[str, Callable[[list[Row]], Awaitable[None]]] = {
                "asyncpg_copy": lambda r: asyncpg_copy(apg, r),
                "asyncpg_executemany": lambda r: asyncpg_executemany(apg, r),
                "asyncpg_unnest": lambda r: asyncpg_unnest(apg, r),
                "psycopg_copy": lambda r: psycopg_copy(ppg, r),
                "psycopg_executemany": lambda r: psycopg_executemany(ppg, r),
            }
            rates: dict[str, list[float]] = {name: [] for name in methods}
            cpu: dict[str, list[float]] = {name: [] for name in methods}
            for rnd in range(rounds):
                for name, run in methods.items():
                    await apg.execute("TRUNCATE events")
                    await apg.execute("CHECKPOINT")
                    t0, c0 = time.perf_counter(), time.process_time()
                    await run(rows)
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
                    count = await apg.fetchval("SELECT count(*) FROM events")
                    if count != len(rows):
                        raise RuntimeError(f"{name} stored {count} rows of {len(rows)}")
                    rates[name].append(len(rows) / dt)
                    cpu[name].append(dc * 1e6 / len(rows))
                    print(
                        f"round {rnd + 1} {name:>20}: {len(rows) / dt:10.0f} rows/s,"
                        f" client CPU {dc * 1e6 / len(rows):5.2f} us/row",
                        file=sys.stderr,
                    )
        finally:
            await apg.close()
            await ppg.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
        await admin.close()
    headline: dict[str, Any] = {"rows": n_rows, "tx_rows": TX_ROWS, "rounds": rounds}
    for name in methods:
        headline[f"{name}_rows_per_s"] = round(statistics.median(rates[name]))
        headline[f"{name}_client_cpu_us_per_row"] = round(statistics.median(cpu[name]), 2)
    best_apg = max(headline["asyncpg_copy_rows_per_s"], headline["asyncpg_unnest_rows_per_s"])
    best_ppg = max(headline["psycopg_copy_rows_per_s"], headline["psycopg_executemany_rows_per_s"])
    headline["asyncpg_best_vs_psycopg_best"] = round(best_apg / best_ppg, 3)
    return headline


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="a server and a database to connect to")
    parser.add_argument("--rows", type=int, default=60_000, help="rows per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each method")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.dsn, args.rows, args.rounds))))

#!/usr/bin/env python3
"""Cost of erasure (with and without making freed bytes unrecoverable) and of export.

    python scripts/bench_privacy.py            # 300k events across 30 people (~30 s)
    python scripts/bench_privacy.py --quick    # 60k events

One invocation builds two identical databases (raw SQL, outside the timed part), then:
1. baseline: erase one person with `scrub=False` (delete rows with secure_delete, receipt,
   audit; no VACUUM, no checkpoint);
2. scrubbed: erase the same person in the twin database with VACUUM + wal_checkpoint(TRUNCATE),
   which is what the RPC and the CLI do;
3. export: stream one (other) person's archive, records per second.
Prints each figure, the scrubbed/baseline ratio, VACUUM seconds per 100 MB of database, and
one JSON line at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

from google.protobuf import timestamp_pb2

from pulsesync.kinds import kind_of
from pulsesync.server.clock import SystemClock
from pulsesync.server.compose import build as build_components
from pulsesync.server.config import ServerConfig
from pulsesync.server.privacy.audit import Actor
from pulsesync.server.storage.backend import open_storage
from pulsesync.server.storage.db import Database
from pulsesync.v1 import events_pb2

T0 = 1_767_225_600_000_000


def _event(seq: int, user: int) -> events_pb2.Event:
    e = events_pb2.Event(
        event_id=str(uuid.uuid4()),
        seq=seq,
        device_time=timestamp_pb2.Timestamp(seconds=T0 // 10**6),
    )
    if seq % 2:
        e.heart_rate.sensor_id, e.heart_rate.bpm = f"AA:BB:{user:02d}", 60 + seq % 50
    else:
        e.search.app, e.search.query, e.search.result_count = "notes", f"query {user} {seq}", 3
    return e


def build(path: Path, people: int, per_person: int) -> None:
    """Users, one device each, and their events, written directly (not timed)."""
    asyncio.run(_migrate(path))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    for u in range(1, people + 1):
        conn.execute(
            "INSERT INTO users (user_id, name, create_us) VALUES (?, ?, ?)", (u, f"person-{u}", T0)
        )
        conn.execute(
            "INSERT INTO devices (device_pk, device_id, user_id, name, kind, token_hash, pair_us)"
            " VALUES (?, ?, ?, ?, 1, ?, ?)",
            (u, f"dev_{u:016x}", u, f"phone {u}", uuid.uuid4().bytes, T0),
        )
        rows = []
        for seq in range(1, per_person + 1):
            e = _event(seq, u)
            rows.append((u, seq, u, T0 + seq * 1000, kind_of(e), T0, e.SerializeToString()))
        conn.executemany(
            "INSERT INTO events (device_pk, seq, user_id, t_us, kind, received_us, body)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


async def _migrate(path: Path) -> None:
    async with await Database.open(path):
        pass


async def erase(data_dir: Path, user_id: int, scrub: bool) -> tuple[float, float, int]:
    """Seconds for the erasure, seconds of VACUUM inside it, database bytes afterwards."""
    config = ServerConfig(data_dir=data_dir)
    async with open_storage(config.database) as storage:
        center = (await build_components(config, storage, SystemClock())).privacy
        t0 = time.perf_counter()
        _, report = await center.erase(user_id, Actor.ADMIN, scrub=scrub)
        took = time.perf_counter() - t0
    vacuum = report.vacuum_seconds + report.checkpoint_seconds if report else 0.0
    return took, vacuum, config.database.stat().st_size


async def export(data_dir: Path, user_id: int) -> tuple[float, int, int]:
    """Seconds, records and bytes of one person's export stream."""
    config = ServerConfig(data_dir=data_dir)
    async with open_storage(config.database) as storage:
        center = (await build_components(config, storage, SystemClock())).privacy
        t0 = time.perf_counter()
        n = size = 0
        async for name, chunk in center.export(user_id, Actor.ADMIN):
            if name != "manifest.json":
                n += chunk.count(b"\n")
            size += len(chunk)
        return time.perf_counter() - t0, n, size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--people", type=int, default=30)
    parser.add_argument("--events-per-person", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.people, args.events_per_person = 12, 5_000
    with tempfile.TemporaryDirectory() as tmp:
        base, scrubbed = Path(tmp, "baseline"), Path(tmp, "scrubbed")
        for d in (base, scrubbed):
            d.mkdir()
            build(d / "pulsesync.db", args.people, args.events_per_person)
        db_bytes = (scrubbed / "pulsesync.db").stat().st_size
        total = args.people * args.events_per_person
        print(f"database: {total} events of {args.people} people, {db_bytes / 1e6:.1f} MB")

        t_base, _, _ = asyncio.run(erase(base, 1, scrub=False))
        t_scrub, t_vacuum, after = asyncio.run(erase(scrubbed, 1, scrub=True))
        ratio = t_scrub / t_base
        per_100mb = t_vacuum / (db_bytes / 1e8)
        print(
            f"erase one person ({args.events_per_person} events), rows only: {t_base * 1000:.0f} ms"
        )
        print(
            f"erase with VACUUM + checkpoint(TRUNCATE): {t_scrub * 1000:.0f} ms "
            f"({ratio:.1f}x the baseline; scrub {t_vacuum * 1000:.0f} ms, "
            f"{per_100mb:.2f} s per 100 MB; file {db_bytes / 1e6:.1f} -> {after / 1e6:.1f} MB)"
        )
        t_exp, n, size = asyncio.run(export(scrubbed, 2))
        print(
            f"export one person: {n} records, {size / 1e6:.1f} MB in {t_exp:.2f} s ({n / t_exp:,.0f} records/s)"
        )
    print(
        json.dumps(
            {
                "db_mb": round(db_bytes / 1e6, 1),
                "erase_rows_only_ms": round(t_base * 1000, 1),
                "erase_scrubbed_ms": round(t_scrub * 1000, 1),
                "scrub_vs_rows_only": round(ratio, 2),
                "vacuum_s_per_100mb": round(per_100mb, 3),
                "export_records_per_s": round(n / t_exp),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

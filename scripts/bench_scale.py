#!/usr/bin/env python3
"""PulseSync beyond one machine: ingest, CPU, cross-replica fan-out and failover, measured.

One invocation, its baselines in the same run, ends with one JSON line. PostgreSQL phases use
scratch databases created and dropped here; servers are real `pulsesync serve` processes
(tests/support/serve.py) on 127.0.0.1, each with a fresh data directory, sharing the
key-encryption key (PULSESYNC_KEK) and a key vault database (--key-vault postgresql://...).

1. Writer vs COPY floor (in-process): AGENTS devices send 500-event batches to a
   `PostgresEventWriter`, WINDOW batches in flight; the floor is a bare binary COPY of the
   same rows into the same events table (FLOOR_TX_ROWS rows per transaction, as many
   connections as the writer has workers). Alternating, on an emptied table after a
   CHECKPOINT; medians. `vs_copy_floor` = writer / floor (goal >= 0.4).
2. Ingest over gRPC on PostgreSQL: AGENTS real `IngestService.Upload` bidi streams (fresh
   devices every run, 500-event batches of realistic events, WINDOW in flight, as the edge
   agent's uplink sends them) against one replica, then against two (agents spread over both).
   The rate counts events acked, so committed. Server CPU per event: user + system time of
   each replica process and its descendants (/proc; children that exited and were reaped
   count through cutime), over the run; PostgreSQL's own backends are reported apart.
3. The same gRPC workload on a SQLite server (its writer process is a child, so counted):
   `cpu_us_per_event_sqlite` beside `cpu_us_per_event_postgres` (the one-replica runs).
4. Cross-replica watch: a ~4 KiB profile; device A edits it on replica A (UpdateProfile),
   device B watches it on replica B and on replica A at once. Per edit, the time until each
   stream delivers the version: B's is `cross_replica_watch_*` (goal p99 < 25 ms), A's the
   same-replica baseline.
5. Failover: FAILOVER_AGENTS edge-agent uplinks (the product's Outbox + Uplink, both replica
   addresses listed, spread over them) upload a steady trickle; replica B is SIGKILLed.
   `failover_ack_p99_s`: per agent, kill -> its first ack from the survivor (p99 over
   agents; goal < 5 s). `nudge_failover_s`: kill -> the survivor's engine has ticked with
   every nudge shard, B's included (goal < 10 s), read from outside the process: the time
   field of the survivor's JSON log line "took over N nudge shards; deciding for 64"
   (`nudge_shards_held` = 64), which the engine writes at the end of the tick it runs as soon
   as it takes shards over, minus the wall-clock time of the kill. From that tick on the
   taken people's decision points are taken again; those between the kill and it are missed.
   Beside it, `nudge_leases_taken_s`: kill -> the leases table shows every nudge shard held
   (unexpired) by the survivor, polled every 50 ms; and `nudge_takeover_tick_s`: that tick's
   own length as its log line gives it (mostly reading the taken people's last 24 hours of
   events into the features). After the kill every agent drains and
   the events table is checked: every acked event stored once.

    python scripts/bench_scale.py [--quick] [--dsn postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import asyncpg
import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pulsesync.edge_agent.client import Credentials  # noqa: E402
from pulsesync.edge_agent.outbox import Outbox  # noqa: E402
from pulsesync.edge_agent.servers import ServerRotation  # noqa: E402
from pulsesync.edge_agent.uplink import Uplink  # noqa: E402
from pulsesync.hlc import HybridClock  # noqa: E402
from pulsesync.server.clock import SystemClock  # noqa: E402
from pulsesync.server.cluster import NUDGE_SHARDS  # noqa: E402
from pulsesync.server.identity import IdentityStore  # noqa: E402
from pulsesync.server.privacy.consent import CATEGORIES, ConsentStore  # noqa: E402
from pulsesync.server.profiles.crypto import FileKeyStore  # noqa: E402
from pulsesync.server.storage.backend import open_storage  # noqa: E402
from pulsesync.server.storage.database_url import DatabaseUrl  # noqa: E402
from pulsesync.server.storage.postgres.events import (  # noqa: E402
    DEFAULT_WORKERS,
    PostgresEventWriter,
)
from pulsesync.server.storage.postgres.migrate import migrate  # noqa: E402
from pulsesync.server.storage.postgres.pool import PostgresPool  # noqa: E402
from pulsesync.server.timeline.committer import Batch, EventRow  # noqa: E402
from pulsesync.v1 import (  # noqa: E402
    common_pb2,
    events_pb2,
    ingest_pb2,
    profiles_pb2,
    profiles_pb2_grpc,
)
from tests.support.serve import ServeProcess  # noqa: E402

DEFAULT_DSN: Final = os.environ.get(
    "PULSESYNC_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
AGENTS: Final = 8
BATCH_EVENTS: Final = 500
WINDOW: Final = 4
FLOOR_TX_ROWS: Final = 10_000
COLUMNS: Final = ("user_id", "device_pk", "seq", "t_us", "kind", "body", "received_us")
UPLOAD: Final = "/pulsesync.v1.IngestService/Upload"
PROFILE_BYTES: Final = 4 * 1024
FAILOVER_AGENTS: Final = 8
PHASE_S: Final = 120.0  # every wait of a phase is bounded by this


def make_event(seq: int, now_us: int) -> tuple[events_pb2.Event, int]:
    """A realistic mix: mostly heart rate with RR intervals, some steps and screen views."""
    e = events_pb2.Event(event_id=str(uuid.uuid4()), seq=seq)
    t = now_us - 3_600_000_000 + seq * 1000
    e.device_time.seconds, e.device_time.nanos = t // 1_000_000, (t % 1_000_000) * 1000
    if seq % 10 < 7:
        e.heart_rate.sensor_id = "C4:7C:8D:6A:1F:02"
        e.heart_rate.bpm = 60 + seq % 60
        e.heart_rate.rr_intervals_ms.extend([812.5, 798.8])
        return e, events_pb2.EVENT_KIND_HEART_RATE
    if seq % 10 < 9:
        e.steps.sensor_id = "phone"
        e.steps.count = 12
        return e, events_pb2.EVENT_KIND_STEPS
    e.screen_view.app = "reader"
    e.screen_view.screen = "chapter"
    return e, events_pb2.EVENT_KIND_SCREEN_VIEW


def make_rows(user_id: int, device_pk: int, n: int, now_us: int) -> list[EventRow]:
    rows: list[EventRow] = []
    for seq in range(1, n + 1):
        e, kind = make_event(seq, now_us)
        t = e.device_time.seconds * 1_000_000 + e.device_time.nanos // 1000
        rows.append((user_id, device_pk, seq, t, kind, e.SerializeToString(), now_us))
    return rows


def pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


# -- 1. the writer against a raw COPY floor, in-process ---------------------------------------
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


async def writer_vs_floor(target: str, n_events: int, rounds: int) -> dict[str, Any]:
    floor_rates: list[float] = []
    writer_rates: list[float] = []
    cpu: list[float] = []
    per_commit: list[float] = []
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
                "INSERT INTO users (name, create_us) VALUES ($1, 0) RETURNING user_id", f"u{i}"
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
            log(
                f"writer round {rnd + 1}: floor {floor_rates[-1]:9.0f} ev/s, writer"
                f" {writer_rates[-1]:9.0f} ev/s ({writer_rates[-1] / floor_rates[-1]:.2f}),"
                f" {cpu[-1]:.2f} CPU us/event, {per_commit[-1]:.0f} events/commit"
            )
    finally:
        for c in [conn, *floor_conns]:
            await c.close()
        await pool.close()
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
        "writer_cpu_us_per_event": round(statistics.median(cpu), 2),
        "events_per_commit": round(statistics.median(per_commit)),
    }


# -- CPU of processes, from /proc ---------------------------------------------------------------
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds: user + system, plus reaped children's) of a process."""
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(rest[1]), sum(int(x) for x in rest[11:15]) / CLK_TCK


def tree_cpu_s(roots: Sequence[int]) -> float:
    """CPU seconds so far of the root processes and every live descendant (children that
    exited and were reaped are in their parent's cutime/cstime, so still counted)."""
    stats: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (s := _stat(int(name))) is not None:
            stats[int(name)] = s
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, list(roots)
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
            todo.extend(children.get(pid, ()))
    return total


async def backend_cpu_s(conn: asyncpg.Connection, databases: Sequence[str]) -> dict[int, float]:
    """CPU seconds of the PostgreSQL backends connected to these databases (when PostgreSQL
    runs on this machine and its /proc entries are readable; else empty)."""
    pids = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = ANY($1::text[]) AND pid <> pg_backend_pid()",
        list(databases),
    )
    out: dict[int, float] = {}
    for r in pids:
        if (s := _stat(int(r["pid"]))) is not None:
            out[int(r["pid"])] = s[1]
    return out


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- provisioning: people, consents and devices, written before the servers start ------------
@dataclass(frozen=True)
class Device:
    user_id: int
    device_id: str
    token: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)


async def provision(
    store: DatabaseUrl, groups: dict[str, tuple[int, int, int]]
) -> dict[str, list[list[Device]]]:
    """For each group (users, devices per user, device kind): users with every consent granted
    and their paired devices, through the product's identity and consent stores."""
    out: dict[str, list[list[Device]]] = {}
    clock = SystemClock()
    async with open_storage(store) as storage:
        ids = IdentityStore(storage.identity, clock)
        consent = ConsentStore(storage.consent, clock)
        for group, (users, per_user, kind) in groups.items():
            out[group] = []
            for u in range(users):
                user_id = await ids.add_user(f"{group}-{u}")
                for category in CATEGORIES:
                    await consent.set(user_id, category, True, device_id="bench")
                devices = []
                for d in range(per_user):
                    code, _ = await ids.create_pairing_code(user_id)
                    device, token, _ = await ids.pair(code, f"{group}-{u}-{d}", kind)
                    devices.append(Device(user_id, device.device_id, token))
                out[group].append(devices)
    return out


# -- 2 and 3. ingest over gRPC ------------------------------------------------------------------
def build_requests(n_events: int, now_us: int) -> list[bytes]:
    """One agent's Upload requests: seq 1..n in BATCH_EVENTS-event batches, serialized once."""
    out = []
    for batch_id, lo in enumerate(range(0, n_events, BATCH_EVENTS), start=1):
        b = ingest_pb2.EventBatch(batch_id=batch_id)
        b.events.extend(make_event(seq, now_us)[0] for seq in range(lo + 1, lo + BATCH_EVENTS + 1))
        out.append(ingest_pb2.UploadRequest(batch=b).SerializeToString())
    return out


def _stamp(raw: bytes) -> bytes:
    """Set sent_time to now (a second batch field appended: later fields win on parse)."""
    now = time.time_ns() // 1000
    sent = ingest_pb2.EventBatch()
    sent.sent_time.seconds, sent.sent_time.nanos = now // 1_000_000, (now % 1_000_000) * 1000
    return raw + bytes(ingest_pb2.UploadRequest(batch=sent).SerializeToString())


async def upload(address: str, device: Device, requests: list[bytes]) -> None:
    """One agent: the Upload bidi stream with WINDOW batches in flight, until all are acked."""
    async with grpc.aio.insecure_channel(address) as ch:
        raw: Any = ch.stream_stream(UPLOAD, request_serializer=None, response_deserializer=None)
        call = raw(metadata=device.metadata, timeout=PHASE_S)
        inflight = asyncio.Semaphore(WINDOW)

        async def writer() -> None:
            for r in requests:
                await inflight.acquire()
                await call.write(_stamp(r))
            await call.done_writing()

        w = asyncio.create_task(writer())
        acked = 0
        try:
            for _ in requests:
                resp = ingest_pb2.UploadResponse.FromString(await call.read())
                inflight.release()
                if resp.error.reason or resp.rejected:
                    raise RuntimeError(f"unexpected answer: {resp}")
                acked = resp.acked_through_seq
        finally:
            w.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await w
        if acked != len(requests) * BATCH_EVENTS:
            raise RuntimeError(f"{device.device_id} acked through {acked}")


@dataclass
class IngestRun:
    events_per_s: float
    server_cpu_us: float
    backend_cpu_us: float | None


async def ingest_run(
    servers: Sequence[ServeProcess],
    devices: Sequence[Device],
    requests: Sequence[list[bytes]],
    pg: asyncpg.Connection | None = None,
    databases: Sequence[str] = (),
) -> IngestRun:
    """Every device streams its requests to servers[i % len(servers)]; rate and CPU."""
    roots = [s.proc.pid for s in servers if s.proc is not None]
    n = sum(len(r) for r in requests) * BATCH_EVENTS
    pg0 = await backend_cpu_s(pg, databases) if pg is not None else {}
    cpu0, t0 = tree_cpu_s(roots), time.perf_counter()
    await asyncio.wait_for(
        asyncio.gather(
            *(
                upload(servers[i % len(servers)].address, d, r)
                for i, (d, r) in enumerate(zip(devices, requests, strict=True))
            )
        ),
        PHASE_S,
    )
    dt, cpu1 = time.perf_counter() - t0, tree_cpu_s(roots)
    backend: float | None = None
    if pg is not None:
        pg1 = await backend_cpu_s(pg, databases)
        if pg1:
            backend = sum(v - pg0.get(pid, 0.0) for pid, v in pg1.items()) * 1e6 / n
    return IngestRun(n / dt, (cpu1 - cpu0) * 1e6 / n, backend)


async def stored_pg(conn: asyncpg.Connection, devices: Sequence[Device]) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT d.device_id, count(e.seq) AS n, count(DISTINCT e.seq) AS distinct_n,"
        " coalesce(max(e.seq), 0) AS top FROM devices d LEFT JOIN events e USING (device_pk)"
        " WHERE d.device_id = ANY($1::text[]) GROUP BY d.device_id",
        [d.device_id for d in devices],
    )
    out = {}
    for r in rows:
        if r["n"] != r["distinct_n"] or r["n"] != r["top"]:
            raise RuntimeError(f"{r['device_id']}: {r['n']} events, top seq {r['top']}")
        out[r["device_id"]] = int(r["n"])
    return out


def stored_sqlite(path: Path, devices: Sequence[Device]) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        marks = ",".join("?" * len(devices))
        (n,) = conn.execute(
            "SELECT count(*) FROM events e JOIN devices d USING (device_pk)"
            f" WHERE d.device_id IN ({marks})",
            [d.device_id for d in devices],
        ).fetchone()
    finally:
        conn.close()
    return int(n)


def summarize(name: str, runs: list[IngestRun]) -> None:
    for i, r in enumerate(runs, 1):
        backend = f", PostgreSQL backends {r.backend_cpu_us:.1f}" if r.backend_cpu_us else ""
        log(
            f"{name} run {i}: {r.events_per_s:9.0f} ev/s, server CPU"
            f" {r.server_cpu_us:.1f} us/event{backend}"
        )


def med(xs: Sequence[float | None], digits: int = 1) -> float | None:
    vals = [x for x in xs if x is not None]
    return round(statistics.median(vals), digits) if vals else None


# -- leases ---------------------------------------------------------------------------------
DB_NOW: Final = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint"


async def nudge_holders(conn: asyncpg.Connection) -> dict[str, int]:
    """Holder -> nudge shards it holds unexpired now (the database's clock)."""
    rows = await conn.fetch(
        "SELECT holder, count(*) AS n FROM leases WHERE grp = 'nudges' AND holder <> ''"
        f" AND expire_us > {DB_NOW} GROUP BY holder"
    )
    return {r["holder"]: int(r["n"]) for r in rows}


async def wait_for(check: Any, what: str, within_s: float = PHASE_S, poll_s: float = 0.05) -> Any:
    """Poll check() until it returns something truthy; fail naming `what` after within_s."""
    deadline = time.monotonic() + within_s
    while True:
        if value := await check():
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {within_s:.0f} s")
        await asyncio.sleep(poll_s)


def takeover_ticks(server: ServeProcess, offset: int) -> list[tuple[float, int, float]]:
    """(wall time, shards decided for, the tick's own seconds) of each "took over" line the
    server logged after byte `offset` of its log, in order."""
    out = []
    with server.log_path.open("rb") as f:
        f.seek(offset)
        for raw in f.read().splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict) and "nudge_shards_held" in line:
                at = datetime.strptime(line["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
                out.append((at.timestamp(), int(line["nudge_shards_held"]), line["tick_s"]))
    return out


# -- 4. cross-replica watch ---------------------------------------------------------------------
async def watch_phase(
    a: ServeProcess, b: ServeProcess, editor: Device, watcher: Device, rounds: int
) -> dict[str, Any]:
    """Edits on A; the watcher's streams on A (baseline) and on B (cross-replica)."""
    warmup = 10
    arrived: dict[str, list[tuple[int, float]]] = {"a": [], "b": []}
    heard = asyncio.Event()
    hlc = HybridClock(editor.device_id, lambda: time.time_ns() // 1_000_000)
    async with (
        grpc.aio.insecure_channel(a.address) as ch_a,
        grpc.aio.insecure_channel(b.address) as ch_b,
    ):
        on_a = profiles_pb2_grpc.ProfileServiceStub(ch_a)
        version = 0

        async def edit(profile: profiles_pb2.Profile, paths: list[str]) -> int:
            req = profiles_pb2.UpdateProfileRequest(base_version=version, profile=profile)
            for path in paths:
                req.edits.add(field_path=path, stamp=hlc.tick().to_proto())
            resp = await on_a.UpdateProfile(req, metadata=editor.metadata, timeout=30)
            return int(resp.profile.version)

        filler = profiles_pb2.Profile(time_zone="Europe/Paris")
        filler.preferences.app_settings["bench.blob"] = secrets.token_hex(
            (PROFILE_BYTES - 250) // 2
        )
        version = await edit(filler, ["preferences.app_settings/bench.blob", "time_zone"])

        async def read(name: str, channel: grpc.aio.Channel) -> None:
            stub = profiles_pb2_grpc.ProfileServiceStub(channel)
            call = stub.WatchProfile(profiles_pb2.WatchProfileRequest(), metadata=watcher.metadata)
            try:
                async for msg in call:
                    arrived[name].append((msg.profile.version, time.perf_counter()))
                    heard.set()
            except asyncio.CancelledError:
                call.cancel()
                raise

        def first_at(name: str, v: int) -> float | None:
            return next((t for ver, t in arrived[name] if ver >= v), None)

        async def both(v: int) -> tuple[float, float]:
            async with asyncio.timeout(30):
                while (ta := first_at("a", v)) is None or (tb := first_at("b", v)) is None:
                    heard.clear()
                    await heard.wait()
            return ta, tb

        readers = [
            asyncio.create_task(read("a", ch_a)),
            asyncio.create_task(read("b", ch_b)),
        ]
        size = 0
        try:
            await both(version)
            same: list[float] = []
            cross: list[float] = []
            for i in range(warmup + rounds):
                change = profiles_pb2.Profile()
                change.goals.daily_steps = 1000 + i
                t0 = time.perf_counter()
                version = await edit(change, ["goals.daily_steps"])
                ta, tb = await both(version)
                if i >= warmup:
                    same.append((ta - t0) * 1000)
                    cross.append((tb - t0) * 1000)
            got = await on_a.GetProfile(
                profiles_pb2.GetProfileRequest(), metadata=editor.metadata, timeout=30
            )
            size = got.profile.ByteSize()
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
    log(
        f"watch ({size} B profile, {rounds} edits): cross-replica p50 {pct(cross, 0.5):.1f} ms"
        f" p99 {pct(cross, 0.99):.1f} ms; same replica p50 {pct(same, 0.5):.1f} ms"
        f" p99 {pct(same, 0.99):.1f} ms"
    )
    return {
        "profile_bytes": size,
        "watch_rounds": rounds,
        "cross_replica_watch_p50_ms": round(pct(cross, 0.5), 2),
        "cross_replica_watch_p99_ms": round(pct(cross, 0.99), 2),
        "goal_cross_replica_watch_p99_ms": 25,
        "same_replica_watch_p50_ms": round(pct(same, 0.5), 2),
        "same_replica_watch_p99_ms": round(pct(same, 0.99), 2),
    }


# -- 5. failover --------------------------------------------------------------------------------
@dataclass
class EdgeAgent:
    """The product's outbox and uplink for one paired device, with its acks timed."""

    device: Device
    outbox: Outbox
    uplink: Uplink | None = None
    acks: list[tuple[float, str]] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def on_ack(self, _: ingest_pb2.UploadResponse) -> None:
        assert self.uplink is not None
        self.acks.append((time.monotonic(), self.uplink.servers.current))

    async def produce(self, stop: asyncio.Event) -> None:
        """A steady trickle: 5 taps every 100 ms, each append one outbox transaction."""
        i = 0
        while not stop.is_set():
            batch = []
            for _ in range(5):
                e = events_pb2.Event()
                e.tap.app, e.tap.screen, e.tap.target = "bench", "deck", f"card_{i}"
                batch.append(e)
                i += 1
            await self.outbox.append(batch)
            await asyncio.sleep(0.1)


async def failover_phase(
    a: ServeProcess,
    b: ServeProcess,
    survivor: str,
    devices: Sequence[Device],
    work: Path,
    pg: asyncpg.Connection,
) -> dict[str, Any]:
    """Agents on both replicas; B is SIGKILLed; acks from A and the lease takeover timed."""
    addresses = (a.address, b.address)
    agents: list[EdgeAgent] = []
    stop = asyncio.Event()
    try:
        for i, d in enumerate(devices):
            agent = EdgeAgent(d, await Outbox.open(work / f"outbox-{i}.db"))
            creds = Credentials(
                ",".join(addresses), d.device_id, d.token, common_pb2.DEVICE_KIND_PHONE
            )
            agent.uplink = Uplink(agent.outbox, creds, on_ack=agent.on_ack)
            agent.uplink.servers = ServerRotation(addresses, start=i % 2)  # spread: half on each
            agent.tasks = [
                asyncio.create_task(agent.uplink.run()),
                asyncio.create_task(agent.produce(stop)),
            ]
            agents.append(agent)

        async def all_acking() -> bool:
            return all(len(ag.acks) >= 5 for ag in agents)

        await wait_for(all_acking, "acks from every agent")
        holders = await nudge_holders(pg)
        taken_from_b = sum(n for h, n in holders.items() if h != survivor)
        on_b = sum(1 for ag in agents if ag.uplink and ag.uplink.servers.current == b.address)
        log(f"failover: {len(agents)} agents ({on_b} on B), B holds {taken_from_b} nudge shards")
        log_offset = a.log_path.stat().st_size
        killed_wall, killed = time.time(), time.monotonic()
        await b.kill()

        async def survivor_acked_all() -> list[float] | None:
            firsts = []
            for ag in agents:
                t = next((t for t, s in ag.acks if t > killed and s == a.address), None)
                if t is None:
                    return None
                firsts.append(t - killed)
            return firsts

        async def shards_taken() -> float | None:
            held = await nudge_holders(pg)
            if held.get(survivor, 0) == NUDGE_SHARDS:
                return time.monotonic() - killed
            return None

        async def engine_took_over() -> tuple[float, float] | None:
            ticks = takeover_ticks(a, log_offset)
            done = next(((t, s) for t, held, s in ticks if held == NUDGE_SHARDS), None)
            return None if done is None else (done[0] - killed_wall, done[1])

        acks_task = asyncio.create_task(wait_for(survivor_acked_all, "survivor acks", poll_s=0.01))
        leases_task = asyncio.create_task(wait_for(shards_taken, "lease takeover", poll_s=0.05))
        engine_task = asyncio.create_task(
            wait_for(engine_took_over, "the survivor's takeover tick", poll_s=0.05)
        )
        firsts, leases_s, (nudge_s, tick_s) = await asyncio.gather(
            acks_task, leases_task, engine_task
        )

        # Drain: everything recorded is acked, and stored exactly once.
        stop.set()
        await asyncio.gather(*(ag.tasks[1] for ag in agents))

        async def drained() -> bool:
            return all(ag.outbox.acked_through == ag.outbox.last_seq for ag in agents)

        await wait_for(drained, "drained outboxes")
        counts = await stored_pg(pg, [ag.device for ag in agents])
        recorded = {ag.device.device_id: ag.outbox.last_seq for ag in agents}
        lost = sum(max(0, recorded[k] - counts.get(k, 0)) for k in recorded)
        extra = sum(max(0, counts.get(k, 0) - recorded[k]) for k in recorded)
    finally:
        stop.set()
        for ag in agents:
            for task in ag.tasks:
                task.cancel()
            await asyncio.gather(*ag.tasks, return_exceptions=True)
            await ag.outbox.close()
    log(
        "failover: first ack from the survivor per agent (s): "
        + ", ".join(f"{x:.2f}" for x in sorted(firsts))
        + f"; every nudge shard leased by the survivor after {leases_s:.2f} s, decided for"
        f" (its takeover tick done, {tick_s:.2f} s long) after {nudge_s:.2f} s;"
        f" {sum(recorded.values())} events recorded, {lost} lost, {extra} extra"
    )
    return {
        "failover_agents": len(agents),
        "failover_agents_on_killed": on_b,
        "failover_ack_p50_s": round(pct(firsts, 0.5), 2),
        "failover_ack_p99_s": round(pct(firsts, 0.99), 2),
        "goal_failover_ack_p99_s": 5,
        "failover_events_lost": lost,
        "failover_events_duplicated": extra,
        "nudge_shards_taken_over": taken_from_b,
        "nudge_failover_s": round(nudge_s, 2),
        "goal_nudge_failover_s": 10,
        "nudge_leases_taken_s": round(leases_s, 2),
        "nudge_takeover_tick_s": round(tick_s, 2),
    }


# -- the run ----------------------------------------------------------------------------------
def with_database(dsn: str, database: str) -> str:
    return f"{dsn.rpartition('/')[0]}/{database}"


async def postgres_phases(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    floor_db, data_db, vault_db = (f"pulsesync_bench_{tag}{s}" for s in ("_floor", "", "_vault"))
    admin = await asyncpg.connect(args.dsn)
    out: dict[str, Any] = {}
    servers: list[ServeProcess] = []
    try:
        for name in (floor_db, data_db, vault_db):
            await admin.execute(f'CREATE DATABASE "{name}"')
        out |= await writer_vs_floor(with_database(args.dsn, floor_db), args.events, args.rounds)
        await admin.execute(f'DROP DATABASE "{floor_db}" WITH (FORCE)')

        data_dsn, vault_dsn = with_database(args.dsn, data_db), with_database(args.dsn, vault_db)
        FileKeyStore.create(work / "kek.key")
        # Replicas share the key-encryption key and the receipt key, nothing else.
        env = {
            "PULSESYNC_KEK": (work / "kek.key").read_text(),
            "PULSESYNC_RECEIPT_KEY": secrets.token_hex(32),
        }
        rounds = args.ingest_rounds
        bridge, phone = common_pb2.DEVICE_KIND_WEARABLE_BRIDGE, common_pb2.DEVICE_KIND_PHONE
        people = await provision(
            DatabaseUrl("postgres", dsn=data_dsn),
            {
                # Other people for the two-replica runs: a replica taking shards over reads
                # its new people's last day of events once (shard_feed.py), not timed here.
                "ingest1": (AGENTS, rounds, bridge),
                "ingest2": (AGENTS, rounds, bridge),
                "watch": (1, 2, phone),
                "failover": (args.failover_agents, 1, phone),
            },
        )
        per_agent = max(BATCH_EVENTS, args.grpc_events // AGENTS // BATCH_EVENTS * BATCH_EVENTS)
        requests = [build_requests(per_agent, time.time_ns() // 1000) for _ in range(AGENTS)]
        a, b = ServeProcess("replica-a", work), ServeProcess("replica-b", work)
        servers += [a, b]

        def serve_args(name: str) -> list[str]:
            (work / name).mkdir(mode=0o700)
            return [
                "--database",
                data_dsn,
                "--key-vault",
                vault_dsn,
                "--data-dir",
                str(work / name),
            ]

        pg = await asyncpg.connect(data_dsn)
        try:
            await a.start(serve_args("a"), env)

            async def alone() -> str | None:
                held = await nudge_holders(pg)
                return next(iter(held)) if list(held.values()) == [NUDGE_SHARDS] else None

            a_holder = await wait_for(alone, "replica A holding every nudge shard")
            dbs = (data_db, vault_db)

            def run_devices(group: str, r: int) -> list[Device]:
                return [devices[r] for devices in people[group]]

            one = []
            for r in range(rounds):
                one.append(await ingest_run([a], run_devices("ingest1", r), requests, pg, dbs))
                await stored_pg(
                    pg, run_devices("ingest1", r)
                )  # every event once, seq 1..n per device
            summarize("PostgreSQL, 1 replica", one)

            await b.start(serve_args("b"), env)
            half = NUDGE_SHARDS // 2

            async def balanced() -> bool:
                held = await nudge_holders(pg)
                return len(held) == 2 and held.get(a_holder) == half

            await wait_for(balanced, "the nudge shards shared by both replicas")
            two = []
            for r in range(rounds):
                devices = run_devices("ingest2", r)
                two.append(await ingest_run([a, b], devices, requests, pg, dbs))
                await stored_pg(pg, devices)
            summarize("PostgreSQL, 2 replicas", two)
            one_rate = statistics.median(x.events_per_s for x in one)
            two_rate = statistics.median(x.events_per_s for x in two)
            out |= {
                "grpc_events_per_run": per_agent * AGENTS,
                "ingest_rounds": rounds,
                "ingest_events_per_s_one_replica": round(one_rate),
                "ingest_events_per_s_two_replicas": round(two_rate),
                "two_vs_one_replica": round(two_rate / one_rate, 2),
                "cpu_us_per_event_postgres": med([x.server_cpu_us for x in one]),
                "cpu_us_per_event_postgres_two_replicas": med([x.server_cpu_us for x in two]),
                "postgres_backend_cpu_us_per_event": med([x.backend_cpu_us for x in one]),
                # Disk: the events table with its indexes and TOAST, and the change feed.
                "postgres_bytes_per_event": round(
                    await pg.fetchval(
                        "SELECT (pg_total_relation_size('events')"
                        " + pg_total_relation_size('event_changes'))::float8"
                        " / greatest(count(*), 1) FROM events"
                    )
                ),
            }
            editor, watcher = people["watch"][0]
            out |= await watch_phase(a, b, editor, watcher, args.watch_rounds)
            failover_devices = [devices[0] for devices in people["failover"]]
            out |= await failover_phase(a, b, a_holder, failover_devices, work, pg)
        finally:
            await pg.close()
    except BaseException:
        for s in servers:
            log(f"--- {s.name} log (tail) ---\n{s.log()[-4000:]}")
        raise
    finally:
        for s in servers:
            await s.stop(within_s=30)
        for name in (floor_db, data_db, vault_db):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return out


async def sqlite_phase(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The same gRPC ingest workload on a SQLite server (its writer process counted)."""
    data = work / "sqlite"
    data.mkdir(mode=0o700)
    db = data / "pulsesync.db"
    people = await provision(
        DatabaseUrl("sqlite", path=db),
        {"ingest": (AGENTS, args.ingest_rounds, common_pb2.DEVICE_KIND_WEARABLE_BRIDGE)},
    )
    per_agent = max(BATCH_EVENTS, args.grpc_events // AGENTS // BATCH_EVENTS * BATCH_EVENTS)
    requests = [build_requests(per_agent, time.time_ns() // 1000) for _ in range(AGENTS)]
    server = ServeProcess("sqlite", work)
    runs = []
    try:
        await server.start(["--data-dir", str(data)], {"PULSESYNC_KEK": ""})
        for r in range(args.ingest_rounds):
            devices = [d[r] for d in people["ingest"]]
            runs.append(await ingest_run([server], devices, requests))
            stored = await asyncio.to_thread(stored_sqlite, db, devices)
            if stored != per_agent * AGENTS:
                raise RuntimeError(f"SQLite stored {stored} events of {per_agent * AGENTS}")
    except BaseException:
        log(f"--- sqlite server log (tail) ---\n{server.log()[-4000:]}")
        raise
    finally:
        await server.stop(within_s=30)
    summarize("SQLite", runs)
    return {
        "ingest_events_per_s_sqlite": round(statistics.median(x.events_per_s for x in runs)),
        "cpu_us_per_event_sqlite": med([x.server_cpu_us for x in runs]),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        work = Path(tmp)
        out = {"quick": args.quick}
        out |= await postgres_phases(args, work)
        out |= await sqlite_phase(args, work)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="a server and a database to connect to")
    parser.add_argument("--quick", action="store_true", help="a small run, for iteration")
    parser.add_argument("--events", type=int, help="events per writer/floor run (100,000)")
    parser.add_argument("--rounds", type=int, help="writer/floor pairs of runs (3)")
    parser.add_argument("--grpc-events", type=int, help="events per gRPC ingest run (100,000)")
    parser.add_argument("--ingest-rounds", type=int, help="gRPC ingest runs per setup (2)")
    parser.add_argument("--watch-rounds", type=int, help="measured profile edits (200)")
    parser.add_argument("--failover-agents", type=int, help="edge agents in the kill (8)")
    args = parser.parse_args()
    defaults = (
        {"events": 24_000, "rounds": 1, "grpc_events": 24_000, "ingest_rounds": 1,
         "watch_rounds": 40, "failover_agents": 4}
        if args.quick
        else {"events": 100_000, "rounds": 3, "grpc_events": 100_000, "ingest_rounds": 2,
              "watch_rounds": 200, "failover_agents": FAILOVER_AGENTS}
    )  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    print(json.dumps(asyncio.run(main(args))))

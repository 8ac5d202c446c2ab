#!/usr/bin/env python3
"""Durable ingest throughput: batched bidi streams vs one unary call per event vs raw SQLite.

    python scripts/bench_ingest.py            # default run (about half a minute)
    python scripts/bench_ingest.py --quick    # a smaller run for a quick look

One invocation measures, on the same machine and disk:
1. sustained: several agents stream 500-event batches over the real gRPC Upload stream
   (ack after durable commit, WAL + synchronous=FULL) while the events table grows past
   --prefill + --repeat x --events rows. The table is pre-filled with raw SQL (synchronous=OFF,
   outside the timed part) so that the run starts with a large table without ingesting it
   first. --repeat runs (new agent devices each time); the median run is reported;
2. naive: one unary UploadBatch call per event, so one commit per event;
3. floor: raw sqlite3.executemany of the same rows into a plain table (no index) in
   2000-row transactions, WAL + synchronous=FULL and the server's page size: what the disk
   and SQLite alone can do. One floor, into a new table, right after each sustained run.
Every timed phase starts with the disk's dirty pages written back. A single run on a shared
machine can land a few percent either way; vs_floor is the median of the runs' ratios to
their floors, and every run's rate is printed and kept in the JSON line.
The clients run in a separate process so that they do not share the server's core.
Prints each rate, vs_naive and vs_floor, ack latency p50/p99, and one JSON line at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Final

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pulsesync.server.app import running_server  # noqa: E402
from pulsesync.server.config import ServerConfig  # noqa: E402
from pulsesync.server.privacy.consent import CATEGORIES  # noqa: E402
from pulsesync.server.storage.db import PAGE_SIZE  # noqa: E402
from pulsesync.v1 import common_pb2, events_pb2, ingest_pb2, ingest_pb2_grpc  # noqa: E402

UPLOAD: Final = "/pulsesync.v1.IngestService/Upload"
# Batches an agent keeps in flight: what the edge agent's uplink does to hide the commit latency.
WINDOW: Final = 4
FLOOR_TX_ROWS: Final = 2000


def make_event(seq: int, now_us: int) -> events_pb2.Event:
    """A realistic mix: mostly heart rate with RR intervals, some steps and screen views."""
    e = events_pb2.Event(event_id=str(uuid.uuid4()), seq=seq)
    t = now_us - 3_600_000_000 + seq * 1000
    e.device_time.seconds, e.device_time.nanos = t // 1_000_000, (t % 1_000_000) * 1000
    r = seq % 10
    if r < 7:
        hr = e.heart_rate
        hr.sensor_id = "C4:7C:8D:6A:1F:02"
        hr.bpm = 60 + seq % 60
        hr.rr_intervals_ms.extend([812.5, 798.8])
        hr.contact = events_pb2.SENSOR_CONTACT_DETECTED
    elif r < 9:
        e.steps.sensor_id = "phone"
        e.steps.count = 12
        e.steps.interval.FromSeconds(10)
    else:
        e.screen_view.app = "reader"
        e.screen_view.screen = "chapter"
        e.screen_view.dwell.FromMilliseconds(4200)
    return e


def build_requests(n_events: int, batch: int, now_us: int) -> list[bytes]:
    out = []
    seq = 0
    for batch_id in range(1, n_events // batch + 1):
        b = ingest_pb2.EventBatch(batch_id=batch_id)
        b.events.extend(make_event(seq + i + 1, now_us) for i in range(batch))
        seq += batch
        out.append(ingest_pb2.UploadRequest(batch=b).SerializeToString())
    return out


def _stamp(raw: bytes) -> bytes:
    """Set sent_time to now (appending field 2 of the batch: later fields win on parse)."""
    now = time.time_ns() // 1000
    sent = ingest_pb2.EventBatch()
    sent.sent_time.seconds, sent.sent_time.nanos = now // 1_000_000, (now % 1_000_000) * 1000
    extra = ingest_pb2.UploadRequest(batch=sent).SerializeToString()
    return raw + extra


async def _agent(address: str, token: str, requests: list[bytes], start: float) -> list[float]:
    md = (("authorization", f"Bearer {token}"),)
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as ch:
        raw: Any = ch.stream_stream(UPLOAD, request_serializer=None, response_deserializer=None)
        call = raw(metadata=md, timeout=600)
        await asyncio.sleep(max(0.0, start - time.time()))
        sent: list[float] = []
        inflight = asyncio.Semaphore(WINDOW)

        async def writer() -> None:
            for r in requests:
                await inflight.acquire()
                sent.append(time.perf_counter())
                await call.write(_stamp(r))
            await call.done_writing()

        w = asyncio.create_task(writer())
        for i in range(len(requests)):
            resp = ingest_pb2.UploadResponse.FromString(await call.read())
            latencies.append(time.perf_counter() - sent[i])
            inflight.release()
            if resp.error.reason or resp.rejected:
                raise RuntimeError(f"unexpected answer: {resp}")
        await w
    return latencies


async def _naive(address: str, token: str, seconds: float) -> int:
    md = (("authorization", f"Bearer {token}"),)
    n = 0
    now = time.time_ns() // 1000
    async with grpc.aio.insecure_channel(address) as ch:
        stub: Any = ingest_pb2_grpc.IngestServiceStub(ch)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            n += 1
            b = ingest_pb2.EventBatch(batch_id=n, events=[make_event(n, now)])
            b.sent_time.FromMicroseconds(time.time_ns() // 1000)
            await stub.UploadBatch(ingest_pb2.UploadBatchRequest(batch=b), metadata=md, timeout=10)
    return n


def client_process(
    address: str, token_sets: list[list[str]], n_events: int, batch: int, naive_token: str,
    naive_seconds: float, conn: Any,
) -> None:  # fmt: skip
    """Runs in its own process: build the batches once, then stream them when told to, once
    per set of agents (new devices each time, so that every run inserts every event)."""
    now = time.time_ns() // 1000
    per_agent = n_events // len(token_sets[0])
    prepared = [build_requests(per_agent, batch, now) for _ in token_sets[0]]

    async def run(tokens: list[str], start: float) -> tuple[float, float, list[float]]:
        t0 = time.time()
        results = await asyncio.gather(
            *(_agent(address, tok, reqs, start) for tok, reqs in zip(tokens, prepared, strict=True))
        )
        t1 = time.time()
        return max(t0, start), t1, [x for r in results for x in r]

    for tokens in token_sets:
        conn.send("ready")
        start = conn.recv()
        conn.send(asyncio.run(run(tokens, start)))
    conn.recv()  # go on with the naive run
    conn.send(asyncio.run(_naive(address, naive_token, naive_seconds)))


def prefill(db: Path, device_pk: int, user_id: int, rows: int) -> None:
    """Grow the events table fast with raw SQL (not timed, synchronous=OFF)."""
    now = time.time_ns() // 1000
    bodies = [make_event(i + 1, now).SerializeToString() for i in range(1000)]
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    step = 50_000
    for lo in range(0, rows, step):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO events (device_pk, seq, user_id, t_us, kind, received_us, body)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                (
                    device_pk,
                    s + 1,
                    user_id,
                    now - 86_400_000_000 + s * 1000,
                    20,
                    now,
                    bodies[s % 1000],
                )
                for s in range(lo, min(rows, lo + step))
            ),
        )
        conn.execute("COMMIT")
    conn.close()


def settle_disk() -> None:
    """Write back every dirty page before a timed phase, so that none pays for the last one's
    writes (the pre-fill's 800k rows, or the sustained run's) in its own fsyncs."""
    if hasattr(os, "sync"):
        os.sync()


def floor_rows(n_events: int) -> list[tuple[Any, ...]]:
    """Rows like the sustained run's, in the plain table's column order."""
    now = time.time_ns() // 1000
    return [
        (1, s, 1, now + s, 20, now, make_event(s, now).SerializeToString())
        for s in range(1, n_events + 1)
    ]


_FLOOR_ROWS: list[tuple[Any, ...]] = []


def floor_process(path: Path, n_events: int) -> float:
    """The floor in the floor process (rows built once): alone, not beside the idle server."""
    if len(_FLOOR_ROWS) != n_events:
        _FLOOR_ROWS[:] = floor_rows(n_events)
    settle_disk()
    return floor(path, _FLOOR_ROWS)


def floor(path: Path, rows: list[tuple[Any, ...]]) -> float:
    """Raw executemany of rows into a new plain table; rows/s."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # as the server's database: a fair floor
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE plain (device_pk INTEGER, seq INTEGER, user_id INTEGER, t_us INTEGER,"
        " kind INTEGER, received_us INTEGER, body BLOB)"
    )
    t0 = time.perf_counter()
    for lo in range(0, len(rows), FLOOR_TX_ROWS):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO plain VALUES (?, ?, ?, ?, ?, ?, ?)", rows[lo : lo + FLOOR_TX_ROWS]
        )
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    conn.close()
    return len(rows) / elapsed


def _process_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _writer_cpu(pid: int | None) -> float:
    """CPU seconds of the ingest writer process so far (Linux /proc; 0 where unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _sustained(server: Any, parent: Any, sent: int) -> dict[str, Any]:
    """One sustained run: start the agents, time them, and measure what the server spent."""
    writer = server.servicers["pulsesync.v1.IngestService"].pipeline.writer
    engine = server.servicers["pulsesync.v1.NudgeService"].engine
    registry = server.app.metrics.registry
    commits0 = registry.get_sample_value("pulsesync_ingest_commits_total") or 0.0
    parent.send(time.time() + 0.5)
    # CPU of the server (its process and the ingest writer process) and of its event loop
    # thread (this one) over the run: what each ingested event costs, a figure that other jobs
    # on the machine disturb less than the wall-clock rate.
    cpu0, loop0, writer0 = _process_cpu(), time.thread_time(), _writer_cpu(writer.pid)
    t0, t1, latencies = await asyncio.to_thread(parent.recv)
    cpu1, loop1, writer1 = _process_cpu(), time.thread_time(), _writer_cpu(writer.pid)
    commits = int((registry.get_sample_value("pulsesync_ingest_commits_total") or 0.0) - commits0)
    # Off the ack path, the nudge features fold every committed event of a consenting person
    # (on their tick, or as soon as 50,000 are queued): what the run left is folded here.
    queued = engine.pending_events()
    fold0 = time.thread_time()
    await engine.flush()
    fold_cpu = time.thread_time() - fold0
    return {
        "sustained_events_per_s": round(sent / (t1 - t0)),
        "ack_p50_ms": round(_pct(latencies, 0.5) * 1000, 1),
        "ack_p99_ms": round(_pct(latencies, 0.99) * 1000, 1),
        "events_per_commit": round(sent / max(commits, 1)),
        "server_cpu_us_per_event": round((cpu1 - cpu0 + writer1 - writer0) / sent * 1e6, 2),
        "loop_cpu_us_per_event": round((loop1 - loop0) / sent * 1e6, 2),
        "writer_cpu_us_per_event": round((writer1 - writer0) / sent * 1e6, 2),
        "nudge_fold_us_per_event": round(fold_cpu / queued * 1e6, 2) if queued else None,
    }


async def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    config = ServerConfig(port=0, data_dir=work, grace_seconds=2)
    sent = args.events // args.agents // args.batch * args.batch * args.agents
    async with running_server(config) as server:
        ids = server.app.identity
        user_id = await ids.add_user("bench")
        for category in CATEGORIES:
            await server.app.consent.set(user_id, category, True, device_id="bench")

        async def pair(name: str) -> tuple[int, str]:
            code, _ = await ids.create_pairing_code(user_id)
            device, token, _ = await ids.pair(code, name, common_pb2.DEVICE_KIND_WEARABLE_BRIDGE)
            return device.device_pk, token

        prefill_pk, _ = await pair("archive")
        token_sets = [
            [(await pair(f"agent-{r}-{i}"))[1] for i in range(args.agents)]
            for r in range(args.repeat)
        ]
        _, naive_token = await pair("naive")

        t = time.perf_counter()
        await asyncio.to_thread(prefill, config.database, prefill_pk, user_id, args.prefill)
        print(f"pre-filled {args.prefill:,} rows with raw SQL in {time.perf_counter() - t:.1f} s")

        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=client_process,
            args=(
                server.address,
                token_sets,
                args.events,
                args.batch,
                naive_token,
                args.naive_seconds,
                child,
            ),
        )
        proc.start()
        # Sustained runs and floors alternate, so that both see the disk in the same state:
        # on this kind of machine its throughput drifts down as writes accumulate. The floor
        # runs in a process of its own (in a thread here it shared the GIL with the idle
        # server and lost ~20%).
        loop = asyncio.get_running_loop()
        runs: list[dict[str, Any]] = []
        floors: list[int] = []
        with ProcessPoolExecutor(1, mp_context=ctx) as floor_pool:
            for r in range(args.repeat):
                await asyncio.to_thread(settle_disk)
                assert await asyncio.to_thread(parent.recv) == "ready"
                runs.append(await _sustained(server, parent, sent))
                floor_path = work / f"floor-{r}.db"
                floors.append(
                    round(await loop.run_in_executor(floor_pool, floor_process, floor_path, sent))
                )
                print(
                    f"run {r + 1}: {runs[-1]['sustained_events_per_s']:,} events/s "
                    f"(ack p99 {runs[-1]['ack_p99_ms']} ms), floor {floors[-1]:,} rows/s"
                )
        async with server.app.db.reader.execute("SELECT count(*) FROM events") as c:
            row = await c.fetchone()
        table_rows = int(row[0]) if row else 0

        parent.send("naive")
        naive_n = await asyncio.to_thread(parent.recv)
        proc.join(30)
    naive = naive_n / args.naive_seconds
    # The median run stands for the invocation; every run's rate is kept beside it. vs_floor
    # is the median of each run's ratio to the floor measured right after it.
    median_run = sorted(runs, key=lambda x: x["sustained_events_per_s"])[len(runs) // 2]
    sustained = median_run["sustained_events_per_s"]
    ratios = [x["sustained_events_per_s"] / f for x, f in zip(runs, floors, strict=True)]
    return {
        **median_run,
        "naive_events_per_s": round(naive),
        "floor_events_per_s": round(statistics.median(floors)),
        "vs_naive": round(sustained / naive, 1),
        "vs_floor": round(statistics.median(ratios), 2),
        "events_table_rows": table_rows,
        "agents": args.agents,
        "batch_events": args.batch,
        "sustained_events": sent,
        "runs": args.repeat,
        "sustained_runs": [x["sustained_events_per_s"] for x in runs],
        "floor_runs": floors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run (~20 s)")
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--prefill", type=int, default=None, help="rows before the run")
    parser.add_argument("--events", type=int, default=None, help="events streamed in the run")
    parser.add_argument("--naive-seconds", type=float, default=None)
    parser.add_argument(
        "--repeat", type=int, default=3, help="sustained runs and floor runs (medians reported)"
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="work directory (default: a temp dir)"
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.prefill = args.prefill if args.prefill is not None else (50_000 if args.quick else 800_000)
    args.events = args.events if args.events is not None else (40_000 if args.quick else 400_000)
    args.naive_seconds = args.naive_seconds or (2.0 if args.quick else 5.0)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        r = asyncio.run(bench(args, Path(tmp)))
    print(
        f"sustained (bidi, {r['agents']} agents x {r['batch_events']}-event batches, durable; "
        f"median of {r['runs']}): {r['sustained_events_per_s']:,} events/s, "
        f"{r['events_per_commit']:,} events per commit"
    )
    print(f"naive (unary, one event and one commit per call): {r['naive_events_per_s']:,} events/s")
    print(
        f"floor (raw executemany, 2000-row transactions; median of {r['runs']}): "
        f"{r['floor_events_per_s']:,} events/s"
    )
    print(
        f"vs_naive {r['vs_naive']}x (target >= 20x); vs_floor {r['vs_floor']:.0%} (target >= 40%)"
    )
    print(
        f"server CPU per event {r['server_cpu_us_per_event']} us "
        f"(event loop thread {r['loop_cpu_us_per_event']} us, "
        f"writer process {r['writer_cpu_us_per_event']} us)"
    )
    if r["nudge_fold_us_per_event"] is not None:
        print(
            f"nudge features, folded later off the ack path: {r['nudge_fold_us_per_event']} us per event"
        )
    print(f"ack latency p50 {r['ack_p50_ms']} ms, p99 {r['ack_p99_ms']} ms; "
          f"events table {r['events_table_rows']:,} rows")  # fmt: skip
    print(json.dumps(r))


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    main()

#!/usr/bin/env python3
"""Fairness: another person's ListEvents latency, alone and under a flood from one device.

One real server on loopback over a real SQLite file. Person "ada" has a device that floods
the server with FLOOD_WORKERS concurrent ListEvents(page_size=1000) loops, from a process of its
own (so that the flooding client's CPU is not charged to the server); person "bob" reads small
pages. Bob's p50/p99 are measured first without the flood, then with it, in the same
invocation (compare ratios, not absolute figures, on a shared machine). The flood is hostile:
it ignores RetryInfo and calls again at once. Its served and refused calls are counted. A last
phase is the baseline: the same flood with the per-device row budget lifted (the concurrency
limit alone). Ends with one JSON line; the goal is `ratio` (p99 under flood / p99 alone) <= 3.

    python scripts/bench_fairness.py [--events 20000] [--seconds 10]

Each phase lasts SECONDS (bob reads back to back): the flood's first seconds spend the device's
burst of rows, the rest run at its sustained rate, and both are measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
from google.protobuf import timestamp_pb2

from pulsesync.kinds import kind_of
from pulsesync.server.app import RunningServer, running_server
from pulsesync.server.config import ServerConfig
from pulsesync.server.limits import HeavyReads
from pulsesync.v1 import (
    common_pb2,
    devices_pb2,
    devices_pb2_grpc,
    events_pb2,
    timeline_pb2,
    timeline_pb2_grpc,
)

FLOOD_WORKERS = 12
T0_US = 1_767_225_600_000_000


async def _pair(server: RunningServer, user: str) -> tuple[tuple[str, str], ...]:
    ids = server.app.identity
    user_id = await ids.add_user(user)
    code, _ = await ids.create_pairing_code(user_id)
    async with grpc.aio.insecure_channel(server.address) as ch:
        resp = await devices_pb2_grpc.DeviceServiceStub(ch).PairDevice(
            devices_pb2.PairDeviceRequest(
                pairing_code=code, device_name=f"{user}-phone", kind=common_pb2.DEVICE_KIND_PHONE
            ),
            timeout=30,
        )
    return (("authorization", f"Bearer {resp.token}"),)


async def _seed(server: RunningServer, user: str, n: int) -> None:
    """n events of the user's device, written straight into the table (ingest is not measured)."""
    async with server.app.db.reader.execute(
        "SELECT d.device_pk, d.user_id FROM devices d JOIN users u USING (user_id) WHERE u.name = ?",
        (user,),
    ) as c:
        row = await c.fetchone()
    assert row is not None
    device_pk, user_id = int(row[0]), int(row[1])
    rows = []
    for seq in range(1, n + 1):
        t_us = T0_US + seq * 1_000_000
        e = events_pb2.Event(
            event_id=str(uuid.uuid4()),
            seq=seq,
            device_time=timestamp_pb2.Timestamp(seconds=t_us // 1_000_000),
            search=events_pb2.Search(app="notes", query=f"query {seq}", result_count=3),
        )
        rows.append((device_pk, seq, user_id, t_us, kind_of(e), t_us, e.SerializeToString()))
    async with server.app.db.transaction() as tx:
        await tx.executemany(
            "INSERT INTO events (device_pk, seq, user_id, t_us, kind, received_us, body)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )


def _request(page_size: int) -> timeline_pb2.ListEventsRequest:
    req = timeline_pb2.ListEventsRequest(page_size=page_size)
    req.start_time.FromMicroseconds(T0_US)
    req.end_time.FromMicroseconds(T0_US + 10**12)
    return req


async def _measure(
    stub: timeline_pb2_grpc.TimelineServiceStub, md: object, seconds: float
) -> list[float]:
    """Bob's latencies, in ms, for calls back to back during `seconds`."""
    out = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        await stub.ListEvents(_request(20), metadata=md, timeout=60)  # type: ignore[arg-type]
        out.append((time.perf_counter() - t) * 1000)
    return out


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def _flooded(
    server: RunningServer,
    stub: timeline_pb2_grpc.TimelineServiceStub,
    bob: object,
    ada: tuple[tuple[str, str], ...],
    seconds: float,
) -> tuple[list[float], int, int]:
    """Bob's latencies while ada's device floods from its own process; its served, refused."""
    flooder = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--flood",
        server.address,
        ada[0][1],
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert flooder.stdout is not None
        assert (await flooder.stdout.readline()).strip() == b"flooding"
        flooded = await _measure(stub, bob, seconds)
    finally:
        flooder.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(flooder.communicate(), 60)
    served, refused = (int(x) for x in out.split())
    return flooded, served, refused


async def main(events: int, seconds: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(port=0, data_dir=Path(tmp), grace_seconds=1.0)
        async with running_server(config) as server:
            ada, bob = await _pair(server, "ada"), await _pair(server, "bob")
            await _seed(server, "ada", events)
            await _seed(server, "bob", 200)
            async with grpc.aio.insecure_channel(server.address) as ch:
                stub = timeline_pb2_grpc.TimelineServiceStub(ch)
                await _measure(stub, bob, 1.0)  # warm up
                alone = await _measure(stub, bob, seconds)
                flooded, served, refused = await _flooded(server, stub, bob, ada, seconds)
                # The baseline: the same flood against the concurrency limit alone (no row
                # budget), as the server was before it.
                server.app.heavy_reads = HeavyReads(rows_per_s=math.inf, burst_rows=math.inf)
                unpaced, unpaced_served, _ = await _flooded(server, stub, bob, ada, seconds)
    p99_alone, p99_flood = _p(alone, 99), _p(flooded, 99)
    return {
        "benchmark": "fairness",
        "flood_workers": FLOOD_WORKERS,
        "flood_page_size": 1000,
        "flooder_events": events,
        "seconds_per_phase": seconds,
        "samples_unloaded": len(alone),
        "samples_flood": len(flooded),
        "p50_unloaded_ms": round(_p(alone, 50), 2),
        "p99_unloaded_ms": round(p99_alone, 2),
        "p50_flood_ms": round(_p(flooded, 50), 2),
        "p99_flood_ms": round(p99_flood, 2),
        "ratio": round(p99_flood / p99_alone, 2),
        "goal_ratio_max": 3,
        "flood_served": served,
        "flood_refused": refused,
        "baseline_no_row_budget_p50_flood_ms": round(_p(unpaced, 50), 2),
        "baseline_no_row_budget_p99_flood_ms": round(_p(unpaced, 99), 2),
        "baseline_no_row_budget_ratio": round(_p(unpaced, 99) / p99_alone, 2),
        "baseline_no_row_budget_flood_served": unpaced_served,
    }


async def flood(address: str, authorization: str) -> None:
    """The flooding device (run in its own process): FLOOD_WORKERS loops of 1000-event pages
    until SIGINT, then prints its served and refused counts."""
    md = (("authorization", authorization),)
    served = refused = 0
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = timeline_pb2_grpc.TimelineServiceStub(ch)

        async def worker() -> None:
            nonlocal served, refused
            while not stop.is_set():
                try:
                    await stub.ListEvents(_request(1000), metadata=md, timeout=60)
                    served += 1
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    refused += 1  # a hostile client: no backoff, it calls again at once

        workers = [asyncio.create_task(worker()) for _ in range(FLOOD_WORKERS)]
        print("flooding", flush=True)
        await asyncio.gather(*workers)
    print(served, refused, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--flood", nargs=2, metavar=("ADDRESS", "AUTHORIZATION"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.flood:
        asyncio.run(flood(*args.flood))
        sys.exit(0)
    print(json.dumps(asyncio.run(main(args.events, args.seconds))))
    sys.exit(0)

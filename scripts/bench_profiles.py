#!/usr/bin/env python3
"""Profile watch latency: from device A's UpdateProfile call to device B's receipt.

Two real servers on 127.0.0.1 (real SQLite files, WAL, synchronous=FULL) run side by side:
one encrypting profiles at rest (AES-256-GCM, the product), one storing them in plaintext
(the baseline, only reachable from this benchmark). Rounds alternate between them so both
see the same machine noise. For each profile size, A makes a small edit and the time until
B's open WatchProfile stream delivers that version is recorded; the whole profile (4 KiB or
256 KiB) is merged, sealed, committed and sent on every version.

    python scripts/bench_profiles.py [--rounds 300] [--big-rounds 100]

Ends with one JSON line of headline figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import grpc

from pulsesync.hlc import HybridClock
from pulsesync.server.app import RunningServer, running_server
from pulsesync.server.config import ServerConfig
from pulsesync.v1 import common_pb2, devices_pb2, devices_pb2_grpc, profiles_pb2, profiles_pb2_grpc

SIZES = {"4k": 4 * 1024, "256k": 256 * 1024}


class Pair:
    """Devices A (writer) and B (watcher) of one user on one server."""

    def __init__(self, server: RunningServer, channel: grpc.aio.Channel) -> None:
        self.server = server
        self.stub = profiles_pb2_grpc.ProfileServiceStub(channel)
        self.devices: list[tuple[str, tuple[tuple[str, str], ...]]] = []
        self.watch: Any = None
        self.version = 0
        self.hlc: HybridClock | None = None

    async def setup(self, channel: grpc.aio.Channel) -> None:
        ids = self.server.app.identity
        user_id = await ids.add_user("bench")
        await self.server.app.consent.set(
            user_id, common_pb2.CONSENT_CATEGORY_SYNC, True, device_id="bench"
        )
        for kind in (common_pb2.DEVICE_KIND_PHONE, common_pb2.DEVICE_KIND_DESKTOP):
            code, _ = await ids.create_pairing_code(user_id)
            resp = await devices_pb2_grpc.DeviceServiceStub(channel).PairDevice(
                devices_pb2.PairDeviceRequest(pairing_code=code, device_name="bench", kind=kind),
                timeout=5,
            )
            self.devices.append(
                (resp.device.device_id, (("authorization", f"Bearer {resp.token}"),))
            )
        self.hlc = HybridClock(self.devices[0][0], lambda: time.time_ns() // 1_000_000)
        self.watch = self.stub.WatchProfile(
            profiles_pb2.WatchProfileRequest(), metadata=self.devices[1][1]
        )

    async def write(self, profile: profiles_pb2.Profile, paths: list[str]) -> float:
        """One edit by A; seconds until B has the version it made."""
        assert self.hlc is not None
        req = profiles_pb2.UpdateProfileRequest(base_version=self.version, profile=profile)
        for path in paths:
            req.edits.add(field_path=path, stamp=self.hlc.tick().to_proto())
        t0 = time.perf_counter()
        resp = await self.stub.UpdateProfile(req, metadata=self.devices[0][1], timeout=10)
        while True:
            msg = await asyncio.wait_for(self.watch.read(), 10)
            if msg.profile.version >= resp.profile.version:
                break
        elapsed = time.perf_counter() - t0
        self.version = resp.profile.version
        return elapsed


class PlaintextSealer:
    """The baseline's sealer: no encryption, so the difference is what encryption costs."""

    def forget(self, key: bytes) -> None:
        """Nothing cached."""

    def seal(self, key: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        return b"", plaintext

    def open(self, key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        return ciphertext


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if q < 100 else max(xs)


async def main(rounds: int, big_rounds: int) -> dict[str, Any]:
    results: dict[str, dict[str, list[float]]] = {"encrypted": {}, "plaintext": {}}
    async with AsyncExitStack() as stack:
        pairs: dict[str, Pair] = {}
        for mode in ("encrypted", "plaintext"):
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            config = ServerConfig(port=0, data_dir=tmp, grace_seconds=0.2)
            sealer = PlaintextSealer() if mode == "plaintext" else None
            server = await stack.enter_async_context(running_server(config, profile_sealer=sealer))
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(server.address))
            pair = Pair(server, channel)
            await pair.setup(channel)
            pairs[mode] = pair
        for size_name, size in SIZES.items():
            n = rounds if size_name == "4k" else big_rounds
            filler = profiles_pb2.Profile(time_zone="Europe/Paris")
            # Random text (incompressible) in 32 KiB app settings, up to the profile size.
            chunk = 32 * 1024
            remaining, k = size - 400, 0
            while remaining > 0:
                take = min(chunk, remaining)
                filler.preferences.app_settings[f"bench.blob{k}"] = secrets.token_hex(take // 2)
                remaining, k = remaining - take - 40, k + 1
            paths = [f"preferences.app_settings/bench.blob{j}" for j in range(k)]
            for pair in pairs.values():
                await pair.write(filler, [*paths, "time_zone"])
            for mode in pairs:
                results[mode][size_name] = []
            for i in range(n + 20):  # 20 warm-up rounds per size, not recorded
                for mode, pair in pairs.items():
                    edit = profiles_pb2.Profile()
                    edit.goals.daily_steps = 1000 + i
                    dt = await pair.write(edit, ["goals.daily_steps"])
                    if i >= 20:
                        results[mode][size_name].append(dt * 1000)
            got = await pairs["encrypted"].server.app.profiles.get(1)
            print(f"{size_name}: profile is {got.ByteSize()} bytes serialized", file=sys.stderr)
        for pair in pairs.values():
            pair.watch.cancel()

    headline: dict[str, Any] = {}
    print(f"{'size':>6} {'mode':>10} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for size_name in SIZES:
        for mode in ("plaintext", "encrypted"):
            xs = results[mode][size_name]
            p50, p99 = pct(xs, 50), pct(xs, 99)
            print(
                f"{size_name:>6} {mode:>10} {len(xs):>5} {p50:8.3f} {p99:8.3f} {statistics.mean(xs):8.3f}"
            )
            prefix = "" if mode == "encrypted" else "baseline_"
            headline[f"{prefix}p50_ms_{size_name}"] = round(p50, 3)
            headline[f"{prefix}p99_ms_{size_name}"] = round(p99, 3)
        enc, base = results["encrypted"][size_name], results["plaintext"][size_name]
        for q in (50, 99):
            ratio = pct(enc, q) / pct(base, q)
            headline[f"encryption_overhead_p{q}_{size_name}"] = round(ratio - 1, 4)
            print(f"{size_name}: encrypted / plaintext p{q} = {ratio:.3f}")
    headline["goal_p99_ms_4k"] = 10
    headline["goal_encryption_overhead"] = 0.05
    return headline


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=300, help="measured rounds for 4 KiB")
    parser.add_argument("--big-rounds", type=int, default=100, help="measured rounds for 256 KiB")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.rounds, args.big_rounds))))

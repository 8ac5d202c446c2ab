"""The Node.js example client (examples/node) runs its whole journey against a real server.

It loads only the committed .proto files with @grpc/grpc-js: pairs with a code minted here
(and retries the pairing with its request_id, as after a lost response), uploads over the bidi
stream, reads and watches the profile, receives a nudge and sends feedback, rotates its token,
and decodes a google.rpc.ErrorInfo. Skipped only where Node is not installed, and
never when CI is set.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pulsesync.server.app import RunningServer, running_server
from pulsesync.server.clock import FakeClock
from pulsesync.server.config import NudgeConfig, ServerConfig
from pulsesync.v1 import common_pb2, events_pb2
from tests.server.nudges.support import steps_event, store
from tests.support.server import pair_device

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"
MIN = 60_000_000
DAY = 24 * 60 * MIN
# Generous: npm ci and Node's start-up on a busy machine.
NPM_TIMEOUT_S = 600.0
JOURNEY_TIMEOUT_S = 300.0
# node_modules is reused while package-lock.json is unchanged.
_STAMP = ".pulsesync-lock-sha256"


def _tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if os.environ.get("CI"):
            pytest.fail(
                "node and npm must be installed where CI is set: the example is tested there"
            )
        pytest.skip("node/npm not installed: the Node.js example cannot run here")
    return node, npm


def _local_noon() -> tuple[int, str]:
    """A local noon 10-70 minutes after the first 100-minute morning that starts now, and the
    whole-hour time zone that has it (in microseconds, an Etc/GMT zone name).

    The server's fake clock starts that morning, a little ahead of the client's real clock, so
    the client's events are never ahead of it and its send times stay well within the server's
    plausible skew (12 h) at any hour of the day this test runs."""
    now = int(time.time() * 1_000_000)
    hour = 60 * MIN
    noon = -(-(now + 110 * MIN) // hour) * hour  # the next whole hour past now + 110 min
    offset = (12 - noon % DAY // hour) % 24  # local = UTC + offset hours puts noon at 12:00
    if offset > 14:
        offset -= 24
    # Etc/GMT names carry the opposite sign (Etc/GMT-3 is UTC+3).
    zone = "Etc/GMT" if offset == 0 else f"Etc/GMT{-offset:+d}"
    return noon, zone


async def _run(*argv: str, cwd: Path, limit_s: float) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), limit_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def _install(npm: str) -> None:
    lock = hashlib.sha256((EXAMPLE / "package-lock.json").read_bytes()).hexdigest()
    stamp = EXAMPLE / "node_modules" / _STAMP
    if stamp.exists() and stamp.read_text() == lock:
        return
    rc, out = await _run(
        npm, "ci", "--no-audit", "--no-fund", "--prefer-offline", cwd=EXAMPLE, limit_s=NPM_TIMEOUT_S
    )
    assert rc == 0, out
    stamp.write_text(lock)


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, FakeClock, int, str]]:
    noon, zone = _local_noon()
    clock = FakeClock(noon - 100 * MIN)
    nudges = NudgeConfig(scheduler="manual", seed=3)
    config = ServerConfig(port=0, data_dir=tmp_path, grace_seconds=0.5, nudges=nudges)
    async with running_server(config, clock=clock) as server:
        eng = _engine(server)
        eng.catalog = replace(
            eng.catalog, policy=replace(eng.catalog.policy, cold_start_send_probability=1.0)
        )
        yield server, clock, noon, zone


def _engine(server: RunningServer) -> Any:
    return server.servicers["pulsesync.v1.NudgeService"].engine  # type: ignore[attr-defined]


async def _stream_open(server: RunningServer, device_id: str) -> None:
    """Wait until the server holds the device's nudge stream."""
    eng = _engine(server)
    loop = asyncio.get_running_loop()
    end = loop.time() + 60
    while not eng.delivery.has_stream(device_id):
        assert loop.time() < end, "the Node client's nudge stream never opened"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(900)
async def test_the_node_client_completes_the_journey(
    srv: tuple[RunningServer, FakeClock, int, str],
) -> None:
    node, npm = _tools()
    server, clock, noon, zone = srv
    await _install(npm)
    # The person's watch, with consent to everything; the Node app pairs as their phone.
    watch = await pair_device(server, "ada", kind=common_pb2.DEVICE_KIND_WEARABLE_BRIDGE)
    user_id = await server.app.identity.user_id_by_name("ada")
    # The person lives where it is noon at `noon` (the decision point the journey waits for).
    await server.app.profiles.edit(user_id, lambda p: setattr(p, "time_zone", zone))
    code, _ = await server.app.identity.create_pairing_code(user_id)

    env = {**os.environ, "PULSESYNC_NUDGE_WAIT_S": "240"}
    proc = await asyncio.create_subprocess_exec(
        node, "journey.js", server.address, code,
        cwd=EXAMPLE, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    steps: dict[str, dict[str, Any]] = {}
    try:
        async with asyncio.timeout(JOURNEY_TIMEOUT_S):
            while line := await proc.stdout.readline():
                step = json.loads(line)
                steps[step["step"]] = step
                if step["step"] == "subscribe_nudges":
                    # A long sedentary morning on the watch, then the noon decision: the
                    # nudge goes to the one device that can receive it, the Node app.
                    await _stream_open(server, step["device_id"])
                    start = noon - 100 * MIN
                    events = [steps_event(start + m * MIN, 2) for m in range(1, 95)]
                    await store(server, watch.device_id, events)
                    eng = _engine(server)
                    clock.set_us(start + 96 * MIN)
                    await eng.tick()
                    clock.set_us(noon + 20 * MIN)
                    sent = [d for d in await eng.tick() if d.nudge is not None]
                    assert len(sent) == 1
            rc = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stderr = (await proc.stderr.read()).decode(errors="replace")
    assert rc == 0, (steps, stderr)
    assert all(s["ok"] for s in steps.values()), steps

    bad = steps["bad_call"]
    assert (bad["code"], bad["reason"]) == ("INVALID_ARGUMENT", "PAIRING_CODE_MALFORMED")
    assert bad["domain"]
    pair = steps["pair"]
    assert pair["user_name"] == "ada"
    # The retried PairDevice got the first answer back: same token, same device, no second one.
    assert steps["pair_retry"]["same_token"]
    assert steps["pair_retry"]["device_id"] == pair["device_id"]
    assert len(await server.app.identity.list_devices(user_id)) == 2  # the watch and the app
    rotate = steps["rotate_token"]
    assert rotate["same_token_on_retry"]
    assert rotate["device_id"] == pair["device_id"]
    upload = steps["upload"]
    assert upload["batches"] == 3  # five events in batches of two
    assert upload["acked_through_seq"] == 5
    assert upload["accepted"] == 5
    assert upload["outbox_left"] == 0
    assert [a["acked_through_seq"] for a in upload["acks"]] == [2, 4, 5]
    profile = steps["profile"]
    assert profile["theme"] == "dark"
    assert profile["version_seen"] == profile["version_written"] > profile["version_read"]
    nudge = steps["nudge"]
    assert nudge["via"] == "stream"
    assert steps["feedback"]["nudge_id"] == nudge["nudge_id"]

    # The server holds what the client said it did.
    async with server.app.db.reader.execute(
        "SELECT COUNT(*) FROM events e JOIN devices d ON d.device_pk = e.device_pk"
        " WHERE d.device_id = ?",
        (pair["device_id"],),
    ) as cur:
        row = await cur.fetchone()
    assert row == (5,)
    async with server.app.db.reader.execute(
        "SELECT COUNT(*) FROM nudges WHERE nudge_id = ? AND state = 'delivered'",
        (nudge["nudge_id"],),
    ) as cur:
        row = await cur.fetchone()
    assert row == (1,)
    async with server.app.db.reader.execute(
        "SELECT action FROM nudge_feedback WHERE nudge_id = ?", (nudge["nudge_id"],)
    ) as cur:
        actions = [r[0] for r in await cur.fetchall()]
    assert events_pb2.NUDGE_ACTION_OPENED in actions

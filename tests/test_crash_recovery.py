"""Crash recovery across real processes: the server and agents are SIGKILLed mid-stream.

The server runs as `python -m pulsesync.server.cli serve` and agents as
`python -m pulsesync.edge_agent.cli run`, all on 127.0.0.1. Kill points are drawn from a
seeded random source. The oracle reads the server's SQLite file and the agents' outboxes:
per device the stored seqs are exactly 1..N, where N is the last seq the outbox ever
assigned, every event id is stored once, and the outboxes are empty.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from pulsesync.v1 import events_pb2

pytestmark = pytest.mark.slow

SEED = 20261124
# Agents compress about a day into a few seconds so each produces a few thousand events.
SPEED = "40000"
AGENT_FLAGS = ["--backoff-cap", "0.5", "--drain-timeout", "40", "--progress", "5",
               "--linger-ms", "5"]  # fmt: skip


def _run(*args: str, cwd: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"{args}: {out.stderr}"
    return out.stdout


@dataclass
class Server:
    """The real server as a child process, restartable on the same port."""

    data_dir: Path
    log: IO[str]
    port: int = 0
    proc: subprocess.Popen[str] | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        port_file = self.data_dir / "port"
        port_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pulsesync.server.cli", "serve", "--port", str(self.port),
             "--port-file", str(port_file), "--data-dir", str(self.data_dir)],
            stdout=self.log, stderr=self.log, text=True,
        )  # fmt: skip
        self.starts += 1
        deadline = time.monotonic() + 20
        while not port_file.exists():
            assert self.proc.poll() is None, "the server exited at start; see server.log"
            assert time.monotonic() < deadline, "the server did not start listening in 20 s"
            time.sleep(0.02)
        self.port = int(port_file.read_text())

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class AgentProc:
    """One paired agent's state dir and its current `run` process."""

    name: str
    state: Path
    source: str
    seed: int
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def run(self, tmp: Path, duration: float) -> subprocess.Popen[str]:
        with open(tmp / f"{self.name}-{len(self.procs)}.log", "w") as out:  # the child keeps a copy
            proc = subprocess.Popen(
                [sys.executable, "-m", "pulsesync.edge_agent.cli", "--state-dir", str(self.state),
                 "run", "--source", self.source, "--speed", SPEED, "--duration", str(duration),
                 "--seed", str(self.seed), *AGENT_FLAGS],
                stdout=out, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def outbox(self) -> tuple[int, int, int]:
        """(depth, last assigned seq, acked through) from the outbox file."""
        with sqlite3.connect(self.state / "outbox.db") as db:
            meta = dict(db.execute("SELECT key, value FROM meta"))
            (depth,) = db.execute("SELECT count(*) FROM outbox").fetchone()
        return depth, meta["next_seq"] - 1, meta["acked_through"]

    def device_id(self) -> str:
        import json

        return str(json.loads((self.state / "credentials.json").read_text())["device_id"])


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    data = tmp_path / "server"
    data.mkdir()
    _run("pulsesync.server.cli", "users", "add", "ada", "--data-dir", str(data), cwd=tmp_path)
    for category in ("behavior", "activity"):
        _run("pulsesync.server.cli", "privacy", "consent", "ada", category, "grant",
             "--data-dir", str(data), cwd=tmp_path)  # fmt: skip
    with open(tmp_path / "server.log", "w") as log:
        server = Server(data, log)
        server.start()
        try:
            yield server, tmp_path
        finally:
            server.stop()


def _pair(server: Server, tmp: Path, name: str, kind: str, source: str, seed: int) -> AgentProc:
    code = _run("pulsesync.server.cli", "devices", "pair-code", "ada",
                "--data-dir", str(server.data_dir), cwd=tmp).strip()  # fmt: skip
    agent = AgentProc(name, tmp / name, source, seed)
    _run("pulsesync.edge_agent.cli", "--state-dir", str(agent.state), "pair", "--server",
         server.address, "--code", code, "--kind", kind, "--name", name, cwd=tmp)  # fmt: skip
    return agent


def _wait_all(procs: list[subprocess.Popen[str]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("an agent did not finish draining its outbox in time")
    assert [p.returncode for p in procs] == [0] * len(procs)


def _check_exactly_once(server: Server, agents: list[AgentProc]) -> dict[str, int]:
    server.stop()  # a clean stop; the oracle reads the file afterwards
    db = sqlite3.connect(server.data_dir / "pulsesync.db")
    try:
        counts = {}
        for agent in agents:
            depth, last_seq, acked = agent.outbox()
            assert depth == 0, f"{agent.name}: outbox not drained"
            assert acked == last_seq > 0
            rows = db.execute(
                "SELECT e.seq, e.body FROM events e JOIN devices d USING (device_pk)"
                " WHERE d.device_id = ? ORDER BY e.seq",
                (agent.device_id(),),
            ).fetchall()
            seqs = [seq for seq, _ in rows]
            assert seqs == list(range(1, last_seq + 1)), f"{agent.name}: gaps or extras"
            ids = [events_pb2.Event.FromString(body).event_id for _, body in rows]
            assert len(set(ids)) == len(ids), f"{agent.name}: an event id stored twice"
            counts[agent.name] = last_seq
        (quarantined,) = db.execute("SELECT count(*) FROM quarantine").fetchone()
        assert quarantined == 0, "sequence conflicts or invalid events were quarantined"
    finally:
        db.close()
    return counts


def test_server_sigkilled_repeatedly_while_agents_stream(world: tuple[Server, Path]) -> None:
    server, tmp = world
    rng = random.Random(SEED)
    agents = [
        _pair(server, tmp, "phone", "phone", "simulated-phone", 1),
        _pair(server, tmp, "desktop", "desktop", "simulated-desktop", 2),
    ]
    procs = [a.run(tmp, duration=9) for a in agents]
    for _ in range(4):
        time.sleep(rng.uniform(0.8, 2.0))
        server.kill()
        time.sleep(rng.uniform(0.05, 0.5))
        server.start()  # same port, same database
    _wait_all(procs, timeout_s=40)
    counts = _check_exactly_once(server, agents)
    assert server.starts == 5
    assert counts["phone"] > 500, counts
    assert counts["desktop"] > 50, counts


def test_agent_sigkilled_mid_stream_and_restarted(world: tuple[Server, Path]) -> None:
    server, tmp = world
    rng = random.Random(SEED + 1)
    phone = _pair(server, tmp, "phone", "phone", "simulated-phone", 3)
    for _ in range(3):
        proc = phone.run(tmp, duration=30)
        time.sleep(rng.uniform(0.8, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    killed_at = phone.outbox()
    assert killed_at[1] > 0, "the agent committed events before it was killed"
    final = phone.run(tmp, duration=2)
    _wait_all([final], timeout_s=40)
    counts = _check_exactly_once(server, [phone])
    assert counts["phone"] > killed_at[1]

"""A damaged outbox file is refused with a clear message, by the library and by the CLI."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from pulsesync.edge_agent.client import Credentials
from pulsesync.edge_agent.errors import OutboxCorrupt
from pulsesync.edge_agent.outbox import Outbox
from pulsesync.v1 import common_pb2, events_pb2

EVENTS = 3000
# A subprocess on a loaded machine may take long to start; generous, never a measure.
CLI_DEADLINE_S = 100.0


async def _filled_outbox(path: Path) -> None:
    async with await Outbox.open(path) as outbox:
        for start in range(0, EVENTS, 500):
            batch = []
            for i in range(start, start + 500):
                e = events_pb2.Event()
                e.tap.app, e.tap.screen, e.tap.target = "app", "screen", f"button-{i}" * 4
                batch.append(e)
            await outbox.append(batch)
        assert await outbox.count() == EVENTS


def _garbage_in_the_middle(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(8192))


def _truncated(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 3)


def _not_a_database(path: Path) -> None:
    path.write_bytes(b"this is not a database" * 400)


def _wrong_schema(path: Path) -> None:
    path.unlink()
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE outbox (id TEXT, payload TEXT); CREATE TABLE meta (k TEXT, v TEXT);"
    )
    conn.close()


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "garbage": _garbage_in_the_middle,
    "truncated": _truncated,
    "not_a_database": _not_a_database,
    "wrong_schema": _wrong_schema,
}


async def _damaged(tmp_path: Path, how: str) -> Path:
    path = tmp_path / "outbox.db"
    await _filled_outbox(path)
    for suffix in ("-wal", "-shm"):  # the outbox closed cleanly: everything is in the main file
        assert not (tmp_path / f"outbox.db{suffix}").exists()
    CORRUPTIONS[how](path)
    return path


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
async def test_open_refuses_every_kind_of_damage_and_leaves_no_thread(
    tmp_path: Path, how: str
) -> None:
    path = await _damaged(tmp_path, how)
    before = set(threading.enumerate())
    with pytest.raises(OutboxCorrupt, match=r"damaged.*move the file aside"):
        await Outbox.open(path)
    # The database connections' threads end (closing one finishes shortly after close()).
    for t in set(threading.enumerate()) - before:
        if _is_db_thread(t):
            await asyncio.to_thread(t.join, CLI_DEADLINE_S)
            assert not t.is_alive()


def _is_db_thread(t: threading.Thread) -> bool:
    return "aiosqlite" in type(t).__module__ or "aiosqlite" in repr(getattr(t, "_target", None))


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
async def test_agent_run_exits_1_with_a_clear_message(tmp_path: Path, how: str) -> None:
    await _damaged(tmp_path, how)
    Credentials(
        server="127.0.0.1:9",  # never reached: the outbox is checked first
        device_id="dev_test",
        token="t",
        kind=common_pb2.DEVICE_KIND_PHONE,
    ).save(tmp_path / "credentials.json")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pulsesync.edge_agent.cli",
        "--state-dir",
        str(tmp_path),
        "run",
        "--source",
        "simulated-phone",
        "--duration",
        "3",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(CLI_DEADLINE_S):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = err.decode()
    assert proc.returncode == 1, (out, text)
    assert "Traceback" not in text
    assert "is damaged or is not a pulsesync-agent outbox" in text
    assert "move the file aside" in text

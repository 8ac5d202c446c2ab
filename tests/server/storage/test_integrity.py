"""A damaged database is refused at start with what to do: garbage in the middle, truncation."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pulsesync.server.storage.db import Database, DatabaseDamaged, migrate

ROWS = 4000


def _filled(path: Path) -> None:
    migrate(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO users (name, create_us) VALUES (?, ?)",
            ((f"user-{i:06d}-" + "x" * 200, i) for i in range(ROWS)),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def _garbage_in_the_middle(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(64 * 1024))


def _truncated_to_half(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size // 2)


@pytest.mark.parametrize("damage", [_garbage_in_the_middle, _truncated_to_half])
async def test_a_damaged_database_is_refused_on_open(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    path = tmp_path / "pulsesync.db"
    _filled(path)
    damage(path)
    with pytest.raises(DatabaseDamaged, match="is damaged"):
        await Database.open(path)


@pytest.mark.parametrize("damage", [_garbage_in_the_middle, _truncated_to_half])
def test_serve_exits_with_what_to_do_and_no_traceback(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    data = tmp_path / "data"
    _filled(data / "pulsesync.db")
    damage(data / "pulsesync.db")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pulsesync.server.cli",
            "serve",
            "--data-dir",
            str(data),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode != 0
    assert "is damaged" in proc.stderr
    assert ".recover" in proc.stderr
    assert "Traceback" not in proc.stderr

"""The data directory is created 0700 and the database files 0600; lax existing files are fixed."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from pulsesync.server.storage.db import Database


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_new_data_dir_and_database_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask, under which files come out 0644
    try:
        data = tmp_path / "data"
        async with await Database.open(data / "pulsesync.db") as db:
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO users (name, create_us) VALUES ('ada', 1)")
            assert _mode(data) == 0o700
            for name in ("pulsesync.db", "pulsesync.db-wal", "pulsesync.db-shm"):
                assert (data / name).exists(), name
                assert _mode(data / name) == 0o600, name
    finally:
        os.umask(old)


async def test_existing_readable_database_files_are_made_private_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "pulsesync.db"
    async with await Database.open(path):
        pass
    (tmp_path / "pulsesync.db-wal").touch()
    for name in ("pulsesync.db", "pulsesync.db-wal"):
        os.chmod(tmp_path / name, 0o644)
    with caplog.at_level(logging.WARNING):
        async with await Database.open(path):
            assert _mode(path) == 0o600
            assert _mode(tmp_path / "pulsesync.db-wal") == 0o600
    assert any("readable by other users" in r.getMessage() for r in caplog.records)

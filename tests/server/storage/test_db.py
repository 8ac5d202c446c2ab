"""The embedded database file: new files get the server's page size, existing ones keep theirs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from pulsesync.server.storage.db import PAGE_SIZE, migrate


def _page_size(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA page_size").fetchone()[0])
    finally:
        conn.close()


def test_a_new_database_gets_the_server_page_size(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    assert migrate(path)  # the schema was created
    assert _page_size(path) == PAGE_SIZE


def test_an_existing_database_keeps_its_page_size(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")  # created with SQLite's default page size
    conn.close()
    migrate(path)
    assert _page_size(path) == 4096

"""Caps every SQLite database a Python process opens at the size its file has at that moment.

With this directory on PYTHONPATH and PULSESYNC_TEST_CAP_DB_GROWTH=1 in the environment, a child
process (the ingest writer) runs its own code unchanged, but SQLite's `max_page_count` stops its
connections from adding pages: SQLite then answers SQLITE_FULL ("database or disk is full")
exactly as it does on a full disk. Pages freed later by a DELETE (from any connection) are
reused, which is how a test gives the space back.
"""

import os
import sqlite3
from typing import Any

if os.environ.get("PULSESYNC_TEST_CAP_DB_GROWTH") == "1":
    _connect = sqlite3.connect

    def _capped(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = _connect(*args, **kwargs)
        # SQLite never sets the cap below the file's size: 1 means "as large as it is now".
        conn.execute("PRAGMA max_page_count = 1")
        return conn

    sqlite3.connect = _capped  # type: ignore[assignment]

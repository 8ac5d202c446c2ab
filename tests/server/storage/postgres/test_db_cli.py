"""`pulsesync db migrate` on both backends, and the --database value's parsing."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from pathlib import Path

import pytest

from pulsesync.server.storage.database_url import BadDatabaseUrl, parse_database
from pulsesync.server.storage.postgres.migrate import load_migrations
from pulsesync.server.storage.postgres.pool import PostgresPool
from tests.support.postgres import server_dsn, with_database


@pytest.mark.parametrize(
    ("value", "backend", "path"),
    [
        ("pulsesync.db", "sqlite", Path("pulsesync.db")),
        ("/var/lib/pulsesync/p.db", "sqlite", Path("/var/lib/pulsesync/p.db")),
        ("sqlite:///rel/p.db", "sqlite", Path("rel/p.db")),
        ("sqlite:////abs/p.db", "sqlite", Path("/abs/p.db")),
        ("postgresql://u@h/db", "postgres", None),
        ("POSTGRES://u@h:6432/db", "postgres", None),
    ],
)
def test_parse(value: str, backend: str, path: Path | None) -> None:
    parsed = parse_database(value)
    assert parsed.backend == backend
    assert parsed.path == path
    assert (parsed.dsn == value) == (backend == "postgres")


@pytest.mark.parametrize("value", ["", "  ", "mysql://h/db", "sqlite://p.db", "sqlite:///"])
def test_parse_refuses(value: str) -> None:
    with pytest.raises(BadDatabaseUrl):
        parse_database(value)


def test_redacted_hides_the_password() -> None:
    url = parse_database("postgresql://app:s3cret@db.internal:5432/pulse?sslmode=require")
    assert "s3cret" not in url.redacted()
    assert url.redacted() == "postgresql://app:***@db.internal:5432/pulse?sslmode=require"


async def _pulsesync(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pulsesync.server.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PULSESYNC_DATABASE": "", **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_migrate_postgres_by_option_and_by_env(postgres_dsn: str) -> None:
    names = [m.name for m in load_migrations()]
    code, out, _ = await _pulsesync("db", "migrate", "--database", postgres_dsn)
    assert code == 0
    assert [line.removeprefix("applied ") for line in out.splitlines()[:-1]] == names
    assert out.splitlines()[-1].endswith(
        f"{len(names)} migration(s) applied; the schema is current"
    )
    code, out, _ = await _pulsesync("db", "migrate", env={"PULSESYNC_DATABASE": postgres_dsn})
    assert code == 0
    assert out.strip().endswith("the schema is already current")
    async with await PostgresPool.open(postgres_dsn) as pool:
        assert await pool.fetchval("SELECT count(*) FROM schema_migrations") == len(names)


async def test_migrate_sqlite_default_and_url(tmp_path: Path) -> None:
    code, out, _ = await _pulsesync("db", "migrate", "--data-dir", str(tmp_path / "data"))
    assert code == 0
    assert "SQLite" in out
    assert "migration(s) applied" in out
    db = tmp_path / "data" / "pulsesync.db"
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] > 0
    finally:
        conn.close()
    other = tmp_path / "other.db"
    code, out, _ = await _pulsesync("db", "migrate", "--database", f"sqlite:///{other}")
    assert code == 0, out
    assert other.exists()


async def test_unreachable_postgres_and_bad_url_fail_clearly() -> None:
    code, _, err = await _pulsesync(
        "db", "migrate", "--database", "postgresql://app:s3cret@127.0.0.1:1/nothing"
    )
    assert code == 1
    assert "cannot connect to PostgreSQL at postgresql://app:***@127.0.0.1:1/nothing" in err
    assert "s3cret" not in err
    assert "Traceback" not in err
    code, _, err = await _pulsesync("db", "migrate", "--database", "mysql://h/db")
    assert code == 2
    assert "unsupported database scheme" in err


async def test_a_database_that_does_not_exist_is_said_in_one_line(postgres_dsn: str) -> None:
    # The server answers, the database is not there: asyncpg's error was a traceback.
    absent = with_database(server_dsn(), "pulsesync_no_such_database")
    for command in (["db", "migrate"], ["users", "add", "ada"]):
        code, _, err = await _pulsesync(*command, "--database", absent)
        assert code == 1, err
        assert 'database "pulsesync_no_such_database" does not exist' in err
        assert "Traceback" not in err


async def test_a_sqlite_file_that_cannot_be_created_is_said_in_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = await _pulsesync("users", "add", "ada", "--data-dir", str(blocker / "data"))
    assert code == 1, err
    assert (
        f"error: cannot open the database {blocker / 'data' / 'pulsesync.db'}: Not a directory"
        in err
    )
    assert "Traceback" not in err

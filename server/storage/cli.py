"""`pulsesync db`: the database's schema, for either backend.

    pulsesync db migrate [--database URL] [--data-dir DIR] [--db FILE]

Applies the pending migrations and says which (or that the schema is current). Servers migrate
when they start too; the command lets an operator do it first, e.g. before rolling out
replicas of a new release (several replicas starting together are safe as well: PostgreSQL's
runner holds an advisory lock).
"""

from __future__ import annotations

import argparse
from typing import Any

from pulsesync.server.storage.database_url import DatabaseUrl
from pulsesync.server.storage.errors import DatabaseUnavailable


def register(sub: Any) -> None:
    """Add the `db` command group to the `pulsesync` CLI."""
    from pulsesync.server.cli import add_storage_flags

    db = sub.add_parser("db", help="the database's schema (SQLite or PostgreSQL)").add_subparsers(
        dest="db_cmd", required=True
    )
    p = db.add_parser("migrate", help="apply pending schema migrations")
    add_storage_flags(p)  # with --database
    p.set_defaults(handler=cmd_migrate)


def target(args: argparse.Namespace) -> DatabaseUrl:
    """--database, else --db, else the SQLite file in the data directory."""
    if args.database is not None:
        database: DatabaseUrl = args.database
        return database
    from pulsesync.server.cli import config_from

    return DatabaseUrl("sqlite", path=config_from(args).database)


async def cmd_migrate(args: argparse.Namespace) -> int:
    database = target(args)
    if database.is_postgres:
        applied = await _migrate_postgres(database)
        current = f"PostgreSQL {database.redacted()}"
    else:
        import asyncio

        from pulsesync.server.storage.db import migrate

        assert database.path is not None
        applied = await asyncio.to_thread(migrate, database.path)
        current = f"SQLite {database.path}"
    for name in applied:
        print(f"applied {name}")
    if applied:
        print(f"{current}: {len(applied)} migration(s) applied; the schema is current")
    else:
        print(f"{current}: the schema is already current")
    return 0


async def _migrate_postgres(database: DatabaseUrl) -> list[str]:
    try:
        from pulsesync.server.storage.postgres.migrate import migrate
        from pulsesync.server.storage.postgres.pool import PostgresPool
    except ImportError as e:  # asyncpg is the `postgres` extra
        raise SystemExit(
            f"PostgreSQL support is not installed ({e}); install pulsesync[postgres]"
        ) from None
    assert database.dsn is not None
    try:
        pool = await PostgresPool.open(database.dsn, min_size=1, max_size=1)
    except DatabaseUnavailable as e:
        raise SystemExit(str(e)) from None
    async with pool:
        return await migrate(pool)

"""Where the database is: one option (`--database`, env PULSESYNC_DATABASE) for every command.

A value is either a PostgreSQL URL (`postgresql://user@host:5432/db`, or `postgres://`), or a
SQLite file: a plain path, or a `sqlite:///relative.db` / `sqlite:////absolute.db` URL (the
convention of SQLAlchemy and others). Anything else with a `scheme://` is refused with what to
write instead, rather than taken for a file name.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")

ENV: Final = "PULSESYNC_DATABASE"
POSTGRES_SCHEMES: Final = ("postgresql", "postgres")

Backend = Literal["sqlite", "postgres"]


class BadDatabaseUrl(ValueError):
    """The value names no database PulseSync can use."""


@dataclass(frozen=True, slots=True)
class DatabaseUrl:
    """A parsed --database value: the backend and its path or DSN."""

    backend: Backend
    path: Path | None = None  # SQLite
    dsn: str | None = None  # PostgreSQL, as given (passwords included: never log it)

    @property
    def is_postgres(self) -> bool:
        return self.backend == "postgres"

    def redacted(self) -> str:
        """For output and logs: the DSN without its password."""
        if self.dsn is None:
            return str(self.path)
        parts = urlsplit(self.dsn)
        if parts.password is None:
            return self.dsn
        netloc = parts.netloc.rsplit("@", 1)
        host = netloc[-1]
        user = parts.username or ""
        return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, ""))


def parse_database(value: str) -> DatabaseUrl:
    """The backend a --database value names (see the module's docstring)."""
    value = value.strip()
    if not value:
        raise BadDatabaseUrl("the database is empty: give a SQLite file or a postgresql:// URL")
    scheme, sep, rest = value.partition("://")
    if not sep:
        return DatabaseUrl("sqlite", path=Path(value))
    scheme = scheme.lower()
    if scheme in POSTGRES_SCHEMES:
        return DatabaseUrl("postgres", dsn=value)
    if scheme == "sqlite":
        # sqlite:///x.db is x.db (relative), sqlite:////x.db is /x.db.
        if not rest.startswith("/") or rest == "/":
            raise BadDatabaseUrl(
                f"{value!r}: write sqlite:///relative/file.db or sqlite:////absolute/file.db"
            )
        return DatabaseUrl("sqlite", path=Path(rest[1:]))
    raise BadDatabaseUrl(
        f"unsupported database scheme {scheme!r}: give a SQLite file path or a "
        "postgresql://user@host:port/database URL"
    )


def parse_key_vault(value: str) -> Path | DatabaseUrl:
    """A --key-vault value: a SQLite vault file (a path or sqlite:// URL) or the URL of the
    vault's own PostgreSQL database."""
    parsed = parse_database(value)
    if parsed.is_postgres:
        return parsed
    assert parsed.path is not None
    return parsed.path


def parse_read_database(value: str) -> DatabaseUrl:
    """A --read-database value: the URL of a PostgreSQL hot standby (or a pooler in front of
    several) that timeline reads may be served from."""
    parsed = parse_database(value)
    if not parsed.is_postgres:
        raise BadDatabaseUrl(
            f"{value!r}: a read database is a PostgreSQL standby, given as a postgresql:// URL"
        )
    return parsed


def database_from_env() -> DatabaseUrl | None:
    """PULSESYNC_DATABASE, parsed; None when unset or empty."""
    value = os.environ.get(ENV, "")
    return parse_database(value) if value.strip() else None


def argument_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """`parse` as an argparse type: a bad value is reported with its reason (argparse shows
    only "invalid value" for a plain ValueError)."""

    def convert(value: str) -> T:
        try:
            return parse(value)
        except BadDatabaseUrl as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def add_database_option(parser: argparse.ArgumentParser) -> None:
    """Add --database (default: PULSESYNC_DATABASE, else None: the command's SQLite default).

    The parsed value is a DatabaseUrl in args.database."""
    default: DatabaseUrl | None
    try:
        default = database_from_env()
    except BadDatabaseUrl as e:
        parser.error(f"{ENV}: {e}")
    parser.add_argument(
        "--database",
        type=argument_type(parse_database),
        default=default,
        metavar="URL",
        help=(
            "a SQLite file or a postgresql://user@host/db URL (env PULSESYNC_DATABASE; "
            "default the SQLite file in the data directory)"
        ),
    )

"""Server configuration: flags first, then PULSESYNC_* environment variables, then defaults.

`ServerConfig` and its typed parts (`NudgeConfig`, `RetentionConfig`) hold the defaults; every
command builds its configuration with `load_config`, which applies the one rule above to each
setting listed in `SETTINGS` (its field, its environment variable and how to read it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

from pulsesync.server.storage.database_url import (
    DatabaseUrl,
    parse_database,
    parse_key_vault,
    parse_read_database,
)

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 50051
DEFAULT_DATA_DIR: Final = Path("pulsesync-data")


# Real seconds between nudge decision ticks: scheduled decisions land within this of their time.
DEFAULT_NUDGE_TICK_SECONDS: Final = 15.0
# Raw events are kept 400 days: a full year for year-over-year views plus a month of slack.
DEFAULT_RETENTION_DAYS: Final = 400
# An hour between retention sweeps: expiry is measured in days, so an hour late costs nothing.
DEFAULT_RETENTION_SWEEP_SECONDS: Final = 3600.0


def env(name: str, default: str | None = None) -> str | None:
    """The value of PULSESYNC_<NAME>, or default."""
    return os.environ.get(f"PULSESYNC_{name}", default)


@dataclass(frozen=True, slots=True)
class NudgeConfig:
    """The nudge engine's settings."""

    # Seed of the policy's exploration (None: random); simulations fix it to replay a run.
    seed: int | None = None
    tick_seconds: float = DEFAULT_NUDGE_TICK_SECONDS
    # "manual": nothing ticks on its own; a simulation with a fake clock calls tick itself.
    scheduler: Literal["auto", "manual"] = "auto"
    # A catalog file whose keys replace the built-in catalog's (None: the built-in one).
    catalog: Path | None = None
    # The push gateway for devices without an open stream, and its HMAC secret.
    push_url: str | None = None
    push_secret: str = ""


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """How long raw events are kept and how often expired ones are swept."""

    raw_event_days: int = DEFAULT_RETENTION_DAYS
    sweep_seconds: float = DEFAULT_RETENTION_SWEEP_SECONDS


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything `pulsesync serve` can be told."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path = DEFAULT_DATA_DIR
    db_path: Path | None = None
    # --database / PULSESYNC_DATABASE: a SQLite file or a postgresql:// URL (over db_path).
    database_url: DatabaseUrl | None = None
    # --read-database / PULSESYNC_READ_DATABASE: a PostgreSQL hot standby for timeline reads.
    read_database: DatabaseUrl | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Require each device to present a client certificate signed by this CA (mutual TLS).
    tls_client_ca: Path | None = None
    # Allow plaintext on a non-loopback address (bearer tokens in the clear); logged as a warning.
    insecure: bool = False
    # Prometheus metrics on this port (0 picks a free one, None disables).
    metrics_port: int | None = None
    # The key-encryption key file for profile encryption (created with mode 0600 if missing).
    key_file: Path | None = None
    # The key vault holding each person's wrapped data key, apart from the database so that
    # database backups hold ciphertext only (created with mode 0600 if missing).
    # A SQLite file, or the URL of a PostgreSQL database of its own (parse_key_vault).
    key_vault: Path | DatabaseUrl | None = None
    # Write the bound gRPC port here once listening (for supervisors and tests using port 0).
    port_file: Path | None = None
    grace_seconds: float = 5.0
    # Device tokens older than this are refused (TOKEN_EXPIRED); None: no limit.
    max_token_age_s: float | None = None
    nudges: NudgeConfig = field(default_factory=NudgeConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)

    @property
    def database(self) -> Path:
        """The SQLite file (of --database when it names one, else --db or the default), for
        what works on the file itself; refused when --database names PostgreSQL."""
        url = self.database_url
        if url is not None and url.path is not None:
            return url.path
        if url is not None and url.is_postgres:
            raise SystemExit(
                f"this command works on a SQLite file only, not on PostgreSQL "
                f"({url.redacted()}); run it with a SQLite --database"
            )
        return self.db_path or self.data_dir / "pulsesync.db"

    @property
    def store(self) -> DatabaseUrl:
        """Where the server's data lives: the PostgreSQL URL given, else the SQLite file."""
        if self.database_url is not None and self.database_url.is_postgres:
            return self.database_url
        return DatabaseUrl("sqlite", path=self.database)

    @property
    def read_store(self) -> DatabaseUrl | None:
        """The hot standby the TimelineService reads from, if any (PostgreSQL only)."""
        if self.read_database is not None and not self.store.is_postgres:
            raise SystemExit(
                "--read-database (a PostgreSQL standby) needs --database postgresql://... too"
            )
        return self.read_database

    @property
    def kek_file(self) -> Path:
        return self.key_file or self.data_dir / "kek.key"

    @property
    def vault_file(self) -> Path:
        """The SQLite vault file (ValueError when the vault is a PostgreSQL database)."""
        if isinstance(self.key_vault, DatabaseUrl):
            raise ValueError("the key vault is a PostgreSQL database, not a file")
        return self.key_vault or self.data_dir / "keyvault.db"

    @property
    def vault_database(self) -> DatabaseUrl | None:
        """The key vault's PostgreSQL database, when --key-vault names one."""
        return self.key_vault if isinstance(self.key_vault, DatabaseUrl) else None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _flag(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def _scheduler(text: str) -> str:
    if text not in ("auto", "manual"):
        raise ValueError("must be auto or manual")
    return text


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its field (dotted for a part: "nudges.seed"), PULSESYNC_<env>, parser."""

    field: str
    env: str | None
    parse: Callable[[str], Any]


def _duration_s(text: str) -> float:
    from pulsesync.server.identity import parse_duration_s

    return parse_duration_s(text)


SETTINGS: Final[tuple[Setting, ...]] = (
    Setting("host", "HOST", str),
    Setting("port", "PORT", int),
    Setting("data_dir", "DATA_DIR", Path),
    Setting("db_path", "DB", Path),
    Setting("database_url", "DATABASE", parse_database),
    Setting("read_database", "READ_DATABASE", parse_read_database),
    Setting("tls_cert", "TLS_CERT", Path),
    Setting("tls_key", "TLS_KEY", Path),
    Setting("tls_client_ca", "TLS_CLIENT_CA", Path),
    Setting("insecure", "INSECURE", _flag),
    Setting("metrics_port", "METRICS_PORT", int),
    Setting("key_file", "KEY_FILE", Path),
    Setting("key_vault", "KEY_VAULT", parse_key_vault),
    Setting("port_file", None, Path),
    Setting("max_token_age_s", "MAX_TOKEN_AGE", _duration_s),
    Setting("nudges.seed", "NUDGE_SEED", int),
    Setting("nudges.tick_seconds", "NUDGE_TICK_SECONDS", float),
    Setting("nudges.scheduler", "NUDGE_SCHEDULER", _scheduler),
    Setting("nudges.catalog", "NUDGE_CATALOG", Path),
    Setting("nudges.push_url", "PUSH_WEBHOOK_URL", str),
    # The secret never comes from a flag (flags are visible to every user of the machine).
    Setting("nudges.push_secret", "PUSH_WEBHOOK_SECRET", str),
    Setting("retention.raw_event_days", "RETENTION_DAYS", int),
    Setting("retention.sweep_seconds", "RETENTION_SWEEP_SECONDS", float),
)


def load_config(flags: Mapping[str, object] | None = None) -> ServerConfig:
    """The configuration for a command: for each setting, the flag's value when the command
    has that flag and it was given (`flags` maps field names to parsed values, None for not
    given), else PULSESYNC_<env> when set, else the default. ValueError names a bad variable."""
    flags = flags or {}
    top: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {"nudges": {}, "retention": {}}
    for s in SETTINGS:
        value = flags.get(s.field)
        if value is None and s.env is not None:
            raw = env(s.env)
            if raw is not None and raw != "":
                try:
                    value = s.parse(raw)
                except ValueError as e:
                    raise ValueError(f"PULSESYNC_{s.env}={raw!r} is not valid: {e}") from None
        if value is None:
            continue
        part, _, name = s.field.rpartition(".")
        (parts[part] if part else top)[name] = value
    base = ServerConfig(**top)
    config = replace(
        base,
        nudges=replace(base.nudges, **parts["nudges"]),
        retention=replace(base.retention, **parts["retention"]),
    )
    _check(config)
    return config


def _check(config: ServerConfig) -> None:
    """Values a parser accepts but the server cannot use (ValueError naming the setting): a
    port beyond 0..65535 would be bound elsewhere, a tick of 0 would spin."""
    for name, port in (("port", config.port), ("metrics port", config.metrics_port)):
        if port is not None and not 0 <= port <= 65535:
            raise ValueError(f"the {name} must be in 0..65535 (0: any free one), not {port}")
    tick = config.nudges.tick_seconds
    if not (math.isfinite(tick) and tick > 0):
        raise ValueError(f"the nudge tick must be a positive number of seconds, not {tick:g}")

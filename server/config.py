"""Server configuration: flags first, then PULSESYNC_* environment variables, then defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 50051
DEFAULT_DATA_DIR: Final = Path("pulsesync-data")


def env(name: str, default: str | None = None) -> str | None:
    """The value of PULSESYNC_<NAME>, or default."""
    return os.environ.get(f"PULSESYNC_{name}", default)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything `pulsesync serve` can be told."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path = DEFAULT_DATA_DIR
    db_path: Path | None = None
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
    key_vault: Path | None = None
    # Write the bound gRPC port here once listening (for supervisors and tests using port 0).
    port_file: Path | None = None
    grace_seconds: float = 5.0
    extra: dict[str, str] = field(default_factory=dict)
    # Device tokens older than this are refused (TOKEN_EXPIRED); None: no limit.
    max_token_age_s: float | None = None

    @property
    def database(self) -> Path:
        return self.db_path or self.data_dir / "pulsesync.db"

    @property
    def kek_file(self) -> Path:
        return self.key_file or self.data_dir / "kek.key"

    @property
    def vault_file(self) -> Path:
        return self.key_vault or self.data_dir / "keyvault.db"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

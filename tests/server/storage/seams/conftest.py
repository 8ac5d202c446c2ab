"""Fixtures of the domain storage tests, run on both backends (tests/support/storage_backends.py)."""

from tests.support.postgres import migrated_pool, pg_pool, postgres_database, postgres_dsn
from tests.support.storage_backends import backend_server, key_vault, storage_backend

__all__ = [
    "backend_server",
    "key_vault",
    "migrated_pool",
    "pg_pool",
    "postgres_database",
    "postgres_dsn",
    "storage_backend",
]

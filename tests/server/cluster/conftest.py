"""Fixtures of the replica tests (a real PostgreSQL; see tests/support/postgres.py)."""

from tests.support.postgres import migrated_pool, pg_pool, postgres_database, postgres_dsn

__all__ = ["migrated_pool", "pg_pool", "postgres_database", "postgres_dsn"]

"""PostgreSQL's storage failures reach the client as documented reasons, not INTERNAL."""

from __future__ import annotations

import asyncpg
import grpc

from pulsesync.server.errors import PulseSyncError
from pulsesync.server.storage.postgres.errors import storage_error


def _reason(e: BaseException) -> tuple[grpc.StatusCode, str] | None:
    error = storage_error(e)
    if error is None:
        return None
    assert isinstance(error, PulseSyncError)
    return error.code, error.reason


def test_a_full_disk_is_storage_full() -> None:
    assert _reason(asyncpg.DiskFullError("could not extend file")) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "STORAGE_FULL",
    )


def test_a_database_that_does_not_answer_is_storage_unavailable() -> None:
    for e in [
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.TooManyConnectionsError("sorry, too many clients already"),
        ConnectionResetError(104, "Connection reset by peer"),
    ]:
        assert _reason(e) == (grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE"), e


def test_a_wrapped_cause_is_found_and_other_failures_are_left_alone() -> None:
    outer = RuntimeError("storing failed")
    outer.__cause__ = asyncpg.ConnectionFailureError("lost")
    assert _reason(outer) == (grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE")
    assert _reason(asyncpg.UniqueViolationError("duplicate key")) is None
    assert _reason(ValueError("not storage")) is None

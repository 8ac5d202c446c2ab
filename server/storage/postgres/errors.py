"""PostgreSQL's failures that are about the storage itself, as the client's documented errors.

A full disk is STORAGE_FULL (RESOURCE_EXHAUSTED), as on SQLite. A database that is gone for
the moment (the connection lost, the server restarting or shutting down, no connection slot
left) is STORAGE_UNAVAILABLE (UNAVAILABLE): worth retrying after a backoff, which an INTERNAL
would not say. Any other failure is left to the caller (an internal error with its log id).
"""

from __future__ import annotations

from typing import Final

import asyncpg

from pulsesync.server.errors import PulseSyncError, Unavailable
from pulsesync.server.storage.db import storage_full_error

# Failures of the database's availability, not of the statement.
_UNAVAILABLE: Final = (
    asyncpg.PostgresConnectionError,  # 08xxx: the connection failed or is gone
    asyncpg.CannotConnectNowError,  # 57P03: starting up or in recovery
    asyncpg.AdminShutdownError,  # 57P01
    asyncpg.CrashShutdownError,  # 57P02
    asyncpg.TooManyConnectionsError,  # 53300
    asyncpg.InterfaceError,  # the client side of a closed connection
    ConnectionError,
)


def storage_unavailable_error() -> Unavailable:
    return Unavailable(
        "the server's database did not answer; nothing is known to be written. Retry later",
        reason="STORAGE_UNAVAILABLE",
    )


def storage_error(e: BaseException | None) -> PulseSyncError | None:
    """The client's error for e (or an exception it was raised from) if it is about the
    storage; None otherwise."""
    while e is not None:
        if isinstance(e, asyncpg.DiskFullError):
            return storage_full_error()
        if isinstance(e, _UNAVAILABLE):
            return storage_unavailable_error()
        e = e.__cause__ or e.__context__
    return None

"""Errors every storage backend raises in the same terms, so engines never see a driver's types."""

from __future__ import annotations


class StorageError(Exception):
    """The backend failed a statement (I/O, lock timeout, ...); the message is for the log."""


class DuplicateKey(StorageError):
    """A row with the same unique key exists already (a name taken, an id reused)."""


class DatabaseUnavailable(StorageError):
    """The database cannot be opened or reached (a missing folder, no permission, PostgreSQL
    down or the database absent); the message names it (password left out) and says why."""

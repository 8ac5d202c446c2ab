"""File modes of the server's data: the data directory 0700, database and secret files 0600.

The database holds search text, heart rate and consents; other local users must not read it.
New files are created private; an existing file that others can read is made private with a
warning in the log (it was created by an older version or by hand).
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600
# SQLite's write-ahead log and shared-memory index sit beside the database and hold the same
# data; SQLite creates them with the main file's mode.
SIDE_SUFFIXES: Final = ("-wal", "-shm", "-journal")


def private_dir(path: Path) -> None:
    """Create path (and missing parents) with mode 0700; warn if an existing one is open to
    others (an existing directory is not changed: it may be shared on purpose, e.g. /tmp)."""
    missing: list[Path] = []
    at = path
    while not at.exists():
        missing.append(at)
        if at.parent == at:
            break
        at = at.parent
    for new in reversed(missing):
        try:
            new.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(new, DIR_MODE)  # mkdir's mode is filtered by the umask
    if not missing:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077 and not mode & stat.S_ISVTX:
            log.warning(
                "data directory %s is open to other users (mode %o); consider `chmod 700 %s`",
                path,
                mode,
                path,
            )


def private_database(path: Path) -> None:
    """Make the SQLite database at path and its side files 0600, creating the database file
    empty (mode 0600) if missing so that SQLite creates the side files 0600 too."""
    if str(path) == ":memory:":
        return
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        pass
    else:
        try:
            os.fchmod(fd, FILE_MODE)  # the umask may have removed bits, never added: be exact
        finally:
            os.close(fd)
    for file in [path, *(path.with_name(path.name + s) for s in SIDE_SUFFIXES)]:
        try:
            mode = stat.S_IMODE(file.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            log.warning("%s was readable by other users (mode %o); made it 0600", file, mode)
            os.chmod(file, FILE_MODE)


def create_secret_file(path: Path, nbytes: int) -> None:
    """Write nbytes of fresh randomness as hex to path (mode 0600) unless the file exists.

    O_EXCL makes two processes starting at once agree on one secret: the loser keeps the
    winner's file. The caller reads it back and decides what a damaged file means."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(nbytes).hex().encode("ascii"))
        f.flush()
        os.fsync(f.fileno())

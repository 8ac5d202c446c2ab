"""Open profile watches: each device's queue of committed versions, and the stream it reads.

A watch subscribes before it reads, so a version committed in between is queued, not missed;
a watch that falls `MAX_WATCH_BACKLOG` versions behind re-reads from storage instead of
holding an unbounded queue.

Versions committed on another replica arrive as a ring of the person (`reread`): the watch
then reads the versions after its last one from storage, so the data comes from the tables
and a ring heard twice, or for a version already sent, sends nothing twice.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final, Protocol

from pulsesync.server.errors import FailedPrecondition, PulseSyncError
from pulsesync.v1 import profiles_pb2

# Undelivered versions one watch may queue before it re-reads from the database instead.
MAX_WATCH_BACKLOG: Final = 256


class VersionSource(Protocol):
    async def get(self, user_id: int) -> profiles_pb2.Profile: ...

    async def version(self, user_id: int) -> int: ...

    async def versions_after(self, user_id: int, after: int) -> list[profiles_pb2.Profile]: ...


@dataclass(slots=True, eq=False)
class _Watcher:
    items: deque[profiles_pb2.Profile] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    overflow: bool = False
    reread: bool = False  # another replica committed versions: read them from storage
    error: PulseSyncError | None = None

    def push(self, profile: profiles_pb2.Profile) -> None:
        if len(self.items) >= MAX_WATCH_BACKLOG:
            self.items.clear()
            self.overflow = True
        else:
            self.items.append(profile)
        self.wake.set()

    def fail(self, error: PulseSyncError) -> None:
        self.error = error
        self.wake.set()


class ProfileWatches:
    """Every open watch, by person."""

    def __init__(self, source: VersionSource) -> None:
        self._source = source
        self._watchers: dict[int, set[_Watcher]] = defaultdict(set)

    def push(self, user_id: int, profile: profiles_pb2.Profile) -> None:
        for watcher in list(self._watchers.get(user_id, ())):
            watcher.push(profile)

    def reread(self, user_id: int | None) -> None:
        """Versions of the person (of everyone, for None) may have been committed elsewhere:
        every such watch reads from storage what it has not sent yet."""
        groups = (
            list(self._watchers.values())
            if user_id is None
            else [self._watchers.get(user_id, set())]
        )
        for watchers in groups:
            for watcher in list(watchers):
                watcher.reread = True
                watcher.wake.set()

    def watching(self, user_id: int) -> bool:
        return bool(self._watchers.get(user_id))

    def interrupt(self, user_id: int, error: PulseSyncError) -> None:
        for watcher in list(self._watchers.get(user_id, ())):
            watcher.fail(error)

    async def watch(self, user_id: int, after_version: int) -> AsyncIterator[profiles_pb2.Profile]:
        """Every retained version after `after_version` (only the latest when it is 0), then
        each new one as it is committed."""
        source = self._source
        watcher = _Watcher()
        self._watchers[user_id].add(watcher)
        try:
            latest = await source.version(user_id)
            if after_version > latest:
                raise FailedPrecondition(
                    f"after_version {after_version} is newer than the latest profile version "
                    f"{latest} (was the server restored from a backup?); watch again "
                    "with after_version 0",
                    reason="UNKNOWN_VERSION",
                )
            last = after_version
            if after_version == 0:
                # A device with nothing needs only the latest snapshot (a complete state).
                if latest:
                    snapshot = await source.get(user_id)
                    yield snapshot
                    last = snapshot.version
            else:
                for profile in await source.versions_after(user_id, last):
                    yield profile
                    last = profile.version
            while True:
                await watcher.wake.wait()
                watcher.wake.clear()
                if watcher.error is not None:
                    raise watcher.error
                if watcher.overflow or watcher.reread:
                    watcher.overflow = watcher.reread = False
                    watcher.items.clear()
                    for profile in await source.versions_after(user_id, last):
                        yield profile
                        last = profile.version
                while watcher.items:
                    profile = watcher.items.popleft()
                    if profile.version <= last:
                        continue
                    if profile.version > last + 1:  # cannot happen in-process; be safe
                        for missed in await source.versions_after(user_id, last):
                            if missed.version < profile.version:
                                yield missed
                    yield profile
                    last = profile.version
        finally:
            watchers = self._watchers.get(user_id)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._watchers[user_id]

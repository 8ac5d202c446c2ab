"""Consent per category, recorded in an append-only ledger and enforced before storing.

Nothing is granted by default. `ConsentStore.granted(user_id)` is on the ingest hot path, so
the current state is cached per user and the cache is replaced on every change made through
this store (the only writer), which also notifies watchers so changes reach open streams.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pulsesync.kinds import CATEGORY_OF_KIND, CONSENT_CATEGORIES
from pulsesync.server.clock import Clock
from pulsesync.server.errors import InvalidArgument
from pulsesync.server.storage.consent import ConsentStorage
from pulsesync.v1 import common_pb2

__all__ = ["CATEGORIES", "CATEGORY_OF_KIND", "ConsentState", "ConsentStore"]

CATEGORIES: Final = CONSENT_CATEGORIES

CURRENT_POLICY_VERSION: Final = "2026-11"


@dataclass(frozen=True, slots=True)
class ConsentState:
    """The latest choice for one category."""

    category: int
    granted: bool
    change_us: int | None
    policy_version: str
    device_id: str


Watcher = Callable[[int, tuple[ConsentState, ...]], None]


class ConsentStore:
    """Reads and changes consents; the source of truth for what may be stored."""

    def __init__(self, storage: ConsentStorage, clock: Clock) -> None:
        self._storage = storage
        self._clock = clock
        self._granted: dict[int, frozenset[int]] = {}
        self._watchers: dict[int, list[Watcher]] = defaultdict(list)
        self._lock = asyncio.Lock()
        # Ledger entries applied so far, for picking up changes made by another process (the
        # admin CLI): the highest entry seen, and entries this store wrote itself since then.
        self._seen_entry: int | None = None
        self._own_entries: set[int] = set()
        # Called with the person after each change made here (the cluster rings it).
        self.on_change: Callable[[int], None] | None = None

    async def states(self, user_id: int) -> tuple[ConsentState, ...]:
        """One state per category (never-asked categories are not granted)."""
        latest: dict[int, ConsentState] = {}
        for e in await self._storage.entries(user_id):
            latest[e.category] = ConsentState(
                e.category, e.granted, e.change_us, e.policy_version, e.device_id
            )
        return tuple(latest.get(cat, ConsentState(cat, False, None, "", "")) for cat in CATEGORIES)

    async def granted(self, user_id: int) -> frozenset[int]:
        """The categories the user has granted now (cached; hot path)."""
        cached = self._granted.get(user_id)
        if cached is None:
            cached = frozenset(s.category for s in await self.states(user_id) if s.granted)
            self._granted[user_id] = cached
        return cached

    async def set(
        self,
        user_id: int,
        category: int,
        granted: bool,
        *,
        device_id: str,
        policy_version: str = CURRENT_POLICY_VERSION,
    ) -> ConsentState:
        """Record a grant or withdrawal; effective immediately."""
        if category not in CATEGORIES:
            raise InvalidArgument(
                "category must be one of "
                + ", ".join(common_pb2.ConsentCategory.Name(c) for c in CATEGORIES),
                reason="INVALID_CONSENT_CATEGORY",
            )
        now = self._clock.now_us()
        async with self._lock:
            entry_id = await self._storage.append(
                user_id, category, granted, policy_version, device_id, now
            )
            if self._seen_entry is not None:
                self._own_entries.add(entry_id)
            self._granted.pop(user_id, None)
            states = await self.states(user_id)
            self._granted[user_id] = frozenset(s.category for s in states if s.granted)
        for watcher in list(self._watchers.get(user_id, ())):
            watcher(user_id, states)
        if self.on_change is not None:
            self.on_change(user_id)
        return next(s for s in states if s.category == category)

    def watch(self, user_id: int, fn: Watcher) -> Callable[[], None]:
        """Call fn(user_id, states) after each change of the user's consents."""
        self._watchers[user_id].append(fn)

        def cancel() -> None:
            watchers = self._watchers.get(user_id)
            if watchers and fn in watchers:
                watchers.remove(fn)
                if not watchers:
                    del self._watchers[user_id]

        return cancel

    async def sync_external(self) -> int:
        """Apply ledger entries written by another process; returns how many people changed."""
        async with self._lock:
            if self._seen_entry is None:
                self._seen_entry = await self._storage.last_entry_id()
                return 0
            rows = await self._storage.entries_after(self._seen_entry)
            if not rows:
                return 0
            changed = {uid for eid, uid in rows if eid not in self._own_entries}
            self._seen_entry = rows[-1][0]
            self._own_entries = {e for e in self._own_entries if e > self._seen_entry}
            updates: list[tuple[int, tuple[ConsentState, ...]]] = []
            for user_id in sorted(changed):
                states = await self.states(user_id)
                self._granted[user_id] = frozenset(s.category for s in states if s.granted)
                updates.append((user_id, states))
        for user_id, states in updates:
            for watcher in list(self._watchers.get(user_id, ())):
                watcher(user_id, states)
        return len(updates)

    def forget_user(self, user_id: int) -> None:
        """Drop cached state (after erasure)."""
        self._granted.pop(user_id, None)

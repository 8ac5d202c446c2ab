"""Open streams per device, so that revocation and erasure can cut them off at once."""

from __future__ import annotations

import asyncio
import weakref
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from pulsesync.server.errors import PulseSyncError, Unauthenticated
from pulsesync.server.identity import Identity
from pulsesync.server.metrics import Metrics


class SessionRegistry:
    """Tracks the task serving each open stream, by device and by user."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._by_device: dict[int, set[asyncio.Task[object]]] = defaultdict(set)
        self._users: dict[int, int] = {}
        # Why a task was cut off; consumed by the rpc seam (after `track` has exited) to send
        # the right status. Weak keys: a reason never consumed dies with its task.
        self._reasons: weakref.WeakKeyDictionary[asyncio.Task[object], PulseSyncError] = (
            weakref.WeakKeyDictionary()
        )

    @contextmanager
    def track(self, identity: Identity, *, exclusive_key: str | None = None) -> Iterator[None]:
        """Register the current task as serving a stream of this device while inside."""
        task = asyncio.current_task()
        assert task is not None
        tasks = self._by_device[identity.device_pk]
        tasks.add(task)
        self._users[identity.device_pk] = identity.user_id
        self._metrics.connected_devices.set(len(self._by_device))
        try:
            yield
        finally:
            tasks.discard(task)
            if not tasks:
                self._by_device.pop(identity.device_pk, None)
                self._users.pop(identity.device_pk, None)
            self._metrics.connected_devices.set(len(self._by_device))

    def cut_off_device(self, device_pk: int, error: PulseSyncError | None = None) -> int:
        """Cancel every stream of the device; they end with `error`. Returns how many."""
        error = error or Unauthenticated("this device was revoked", reason="DEVICE_REVOKED")
        tasks = list(self._by_device.get(device_pk, ()))
        current = asyncio.current_task()
        for task in tasks:
            if task is current:
                continue
            self._reasons[task] = error
            task.cancel()
        return len(tasks)

    def cut_off_user(self, user_id: int, error: PulseSyncError) -> int:
        """Cancel every stream of every device of the user."""
        devices = [pk for pk, uid in self._users.items() if uid == user_id]
        return sum(self.cut_off_device(pk, error) for pk in devices)

    def reason_for(self, task: asyncio.Task[object] | None) -> PulseSyncError | None:
        """Why this task was cut off, if it was (read once)."""
        return self._reasons.pop(task, None) if task is not None else None

    def connected_devices(self) -> list[int]:
        """Device keys with at least one open stream."""
        return list(self._by_device)

    def connected_device_count(self) -> int:
        return len(self._by_device)

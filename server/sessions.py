"""Open streams per device, so that revocation and erasure can cut them off at once.

With several replicas a device's streams may be open on any of them: a cut made here is rung
to the others (`pulsesync.server.cluster`), which cut their own streams of that device or
person with `local_only=True` (so the ring is not sent on again).
"""

from __future__ import annotations

import asyncio
import weakref
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from pulsesync.server.cluster import DEVICE_REVOKED, USER_ERASED, Signals, spawn
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
        # The other replicas, told of every cut made here (None: a server of one process).
        self.signals: Signals | None = None
        self._rings: set[asyncio.Task[None]] = set()

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

    def cut_off_device(
        self, device_pk: int, error: PulseSyncError | None = None, *, local_only: bool = False
    ) -> int:
        """Cancel every stream of the device (on every replica unless `local_only`); they end
        with `error`. Returns how many were cut here."""
        error = error or Unauthenticated("this device was revoked", reason="DEVICE_REVOKED")
        if not local_only:
            self._ring(DEVICE_REVOKED, device_pk)
        tasks = list(self._by_device.get(device_pk, ()))
        current = asyncio.current_task()
        for task in tasks:
            if task is current:
                continue
            self._reasons[task] = error
            task.cancel()
        return len(tasks)

    def cut_off_user(self, user_id: int, error: PulseSyncError, *, local_only: bool = False) -> int:
        """Cancel every stream of every device of the user (on every replica unless
        `local_only`)."""
        if not local_only:
            self._ring(USER_ERASED, user_id)
        devices = [pk for pk, uid in self._users.items() if uid == user_id]
        return sum(self.cut_off_device(pk, error, local_only=True) for pk in devices)

    def devices_of(self, user_id: int) -> list[int]:
        """The user's devices with a stream open here."""
        return [pk for pk, uid in self._users.items() if uid == user_id]

    def _ring(self, topic: str, key: int) -> None:
        # Called after the revocation or erasure committed; the sweep in app.py still finds
        # a cut whose ring was lost (the sender died between commit and ring).
        if self.signals is not None:
            spawn(self._rings, self.signals.ring(topic, key), f"ring-{topic}")

    def reason_for(self, task: asyncio.Task[object] | None) -> PulseSyncError | None:
        """Why this task was cut off, if it was (read once)."""
        return self._reasons.pop(task, None) if task is not None else None

    def connected_devices(self) -> list[int]:
        """Device keys with at least one open stream."""
        return list(self._by_device)

    def connected_device_count(self) -> int:
        return len(self._by_device)

"""Nudge delivery: each device's stream, push targets, apps that fetch, and falling back.

A nudge is routed to one device when it is made. It reaches that device through its open
stream, through a push provider (a device that registered a push token), or when the app
fetches pending nudges; a stream that closes with nudges undelivered hands them to another
reachable device of the same person.

With several replicas the device's stream may be open on another one: a nudge routed to a
device without a stream here is rung (`NUDGE_CREATED`, the device), and the replica holding
its stream reads the device's pending nudges from storage and claims each one (marking it
delivered) before queueing it, so a nudge reaches the device once whichever path wins. For the
decision to count such a device, each replica records its streams and the fetches it answers
in the cluster's reach record (`reach`), and the deciding replica reads the devices of the
people due for a decision from it once per tick (`refresh_elsewhere`). A push target set or
removed on one replica is rung (`PUSH_TARGET_CHANGED`, the device) and the others read that
device's target again before their next decision (all of them after a lost ring).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Final

from pulsesync.server.clock import Clock
from pulsesync.server.cluster import (
    NUDGE_CREATED,
    PUSH_TARGET_CHANGED,
    DeviceElsewhere,
    NudgeReach,
    Signals,
    spawn,
)
from pulsesync.server.nudges.catalog import Catalog
from pulsesync.server.nudges.eligibility import Reachable, route
from pulsesync.server.nudges.features import FeatureStore
from pulsesync.server.nudges.push import PushProvider
from pulsesync.server.storage.nudges import NudgeRow, NudgeStorage, PushTargetRow
from pulsesync.timeutil import timestamp as _ts
from pulsesync.v1 import nudges_pb2

log = logging.getLogger(__name__)

# A device stream holds at most this many undelivered nudges (caps make more impossible).
STREAM_QUEUE: Final = 32
# An app that fetched pending nudges within this long counts as reachable by fetching: apps
# on a phone wake several times a day; one idle for a day would find its nudges expired.
FETCH_REACH_US: Final = 24 * 3600 * 1_000_000


@dataclass(slots=True)
class _Stream:
    user_id: int
    device_id: str
    kind: int
    queue: asyncio.Queue[nudges_pb2.Nudge | None] = field(
        default_factory=lambda: asyncio.Queue(STREAM_QUEUE)
    )


@dataclass(frozen=True, slots=True)
class _Offline:
    """A device reachable without a stream: by push (token set) or by fetching when it wakes
    (it fetched here); an entry with neither is not kept."""

    user_id: int
    device_id: str
    kind: int
    push_token: str  # "" for a device that only fetches
    fetched_us: int  # when its app last fetched here; 0: never


def nudge_message(row: NudgeRow, device_id: str) -> nudges_pb2.Nudge:
    """The API form of a stored nudge."""
    return nudges_pb2.Nudge(
        nudge_id=row.nudge_id, nudge_type=row.nudge_type, title=row.title, message=row.message,
        data=json.loads(row.data_json), probability=row.probability,
        reasons=json.loads(row.reasons_json), create_time=_ts(row.create_us),
        expire_time=_ts(row.expire_us), device_id=device_id,
    )  # fmt: skip


class NudgeDelivery:
    """Where each of a server's devices can take nudges, and getting them there."""

    def __init__(
        self,
        storage: NudgeStorage,
        clock: Clock,
        catalog: Catalog,
        features: FeatureStore,
        push: PushProvider | None,
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._catalog = catalog
        self._features = features
        self.push = push
        self._streams: dict[int, _Stream] = {}
        # Devices without a stream that still take nudges: push targets (from the database)
        # and apps that fetched pending nudges within the active window (this replica).
        self._offline: dict[int, _Offline] = {}
        # Push targets to read before the next decision: all of them (at first, and after a
        # ring may have been lost), else the devices other replicas rang since the last read.
        self._push_reload = True
        self._push_stale: set[int] = set()
        # Reads and registrations one at a time, so an older read never overwrites a newer one.
        self._push_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        # The other replicas, told of nudges for devices without a stream here.
        self.signals: Signals | None = None
        # The record shared with the other replicas (None: one process, nothing elsewhere),
        # and the devices it said take nudges through other replicas, as of the last tick.
        self.reach: NudgeReach | None = None
        self._elsewhere: dict[int, list[DeviceElsewhere]] = {}  # user_id -> devices
        self._elsewhere_pks: dict[int, DeviceElsewhere] = {}

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def settled(self) -> None:
        """Wait until pushes under way are done."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def forget_user(self, user_id: int) -> None:
        for pk in [pk for pk, o in self._offline.items() if o.user_id == user_id]:
            del self._offline[pk]
        for d in self._elsewhere.pop(user_id, ()):
            self._elsewhere_pks.pop(d.device_pk, None)

    # -- streams --------------------------------------------------------------------------
    def open_stream(
        self, user_id: int, device_pk: int, device_id: str, kind: int
    ) -> asyncio.Queue[nudges_pb2.Nudge | None]:
        """Register a device's nudge stream (a newer one replaces an older one)."""
        old = self._streams.get(device_pk)
        stream = _Stream(user_id, device_id, kind)
        self._streams[device_pk] = stream
        self._features.note_device(user_id, device_pk, kind)
        if self.reach is not None:
            self.reach.stream_opened(user_id, device_pk, device_id, kind)
        if old is not None:
            while not old.queue.empty():
                item = old.queue.get_nowait()
                if item is not None:
                    stream.queue.put_nowait(item)
            old.queue.put_nowait(None)
        return stream.queue

    async def close_stream(
        self, device_pk: int, queue: asyncio.Queue[nudges_pb2.Nudge | None]
    ) -> None:
        """Unregister a stream; its undelivered nudges fall back to another reachable device."""
        stream = self._streams.get(device_pk)
        if stream is None or stream.queue is not queue:
            return
        del self._streams[device_pk]
        if self.reach is not None:
            self.reach.stream_closed(device_pk)
        left = [n for n in (queue.get_nowait() for _ in range(queue.qsize())) if n is not None]
        for nudge in left:
            await self._fallback(stream.user_id, device_pk, nudge)

    async def _fallback(self, user_id: int, from_pk: int, nudge: nudges_pb2.Nudge) -> None:
        t = self._catalog.type(nudge.nudge_type)
        now = self._clock.now_us()
        if nudge.expire_time.ToMicroseconds() <= now:
            return
        devices = [r for r in self.reachable(user_id) if r.device_pk != from_pk]
        pk = route(t, devices)
        if pk is None:
            return  # stays pending for the device; re-sent if it reconnects before expiry
        moved = nudges_pb2.Nudge()
        moved.CopyFrom(nudge)
        stream = self._streams.get(pk)
        moved.device_id = self.device_id(pk)
        await self._storage.route(nudge.nudge_id, pk)
        if stream is not None:
            stream.queue.put_nowait(moved)
        else:
            self._ring(pk)
            self._deliver_offline(pk, moved)

    def reachable(self, user_id: int, now: int | None = None) -> list[Reachable]:
        """Devices a nudge can reach: open streams, push targets, apps that fetch when awake."""
        features = self._features
        state = features.user(user_id) if user_id in features.known_users() else None
        found = [
            Reachable(pk, s.kind, state.device_last_us.get(pk, 0) if state else 0)
            for pk, s in self._streams.items()
            if s.user_id == user_id
        ]
        for pk, o in self._offline.items():
            if o.user_id != user_id or pk in self._streams:
                continue
            if o.push_token and self.push is None:
                continue  # no provider configured: a push target is not a way in
            if not o.push_token and now is not None and now - o.fetched_us > FETCH_REACH_US:
                continue  # an app that has not woken lately would see the nudge too late
            found.append(Reachable(pk, o.kind, state.device_last_us.get(pk, 0) if state else 0))
        for d in self._elsewhere.get(user_id, ()):
            if d.device_pk in self._streams or any(r.device_pk == d.device_pk for r in found):
                continue
            if d.fetched_us and now is not None and now - d.fetched_us > FETCH_REACH_US:
                continue  # as above
            last = state.device_last_us.get(d.device_pk, 0) if state else 0
            found.append(Reachable(d.device_pk, d.kind, last))
        return found

    async def refresh_elsewhere(self, user_ids: Collection[int], now: int) -> None:
        """Read which devices of these people take nudges through other replicas (one query,
        none for nobody; kept for the decisions until the next call). If the record cannot be
        read, the decisions count this replica's own ways in only."""
        if self.reach is None:
            return
        try:
            found = await self.reach.elsewhere(user_ids, now - FETCH_REACH_US) if user_ids else []
        except Exception:
            log.warning("reading the devices reachable elsewhere failed", exc_info=True)
            found = []
        elsewhere: dict[int, list[DeviceElsewhere]] = {}
        for d in found:
            elsewhere.setdefault(d.user_id, []).append(d)
        self._elsewhere = elsewhere
        # A stream elsewhere wins over a fetch (sorted last): it is how a nudge reaches it now.
        self._elsewhere_pks = {d.device_pk: d for d in sorted(found, key=lambda d: -d.fetched_us)}

    def has_stream(self, device_id: str) -> bool:
        """Whether the device has a nudge stream open on this server."""
        return any(s.device_id == device_id for s in self._streams.values())

    def device_id(self, device_pk: int) -> str:
        """The API id of a device that can take nudges ("" if unknown here)."""
        stream = self._streams.get(device_pk)
        offline = self._offline.get(device_pk)
        if stream is not None:
            return stream.device_id
        if offline is not None:
            return offline.device_id
        elsewhere = self._elsewhere_pks.get(device_pk)
        return elsewhere.device_id if elsewhere is not None else ""

    def channel_for(self, device_pk: int) -> str:
        """How a nudge routed to the device now reaches it: stream, push or pending."""
        if device_pk in self._streams:
            return "stream"
        o = self._offline.get(device_pk)
        if o is not None and o.push_token and self.push is not None:
            return "push"
        elsewhere = self._elsewhere_pks.get(device_pk)
        if elsewhere is not None and not elsewhere.fetched_us:
            return "stream"  # on another replica, rung there
        return "pending"

    def send(self, device_pk: int, nudge: nudges_pb2.Nudge) -> None:
        """Hand a new nudge to its device's stream, or push it; else it waits to be fetched."""
        stream = self._streams.get(device_pk)
        if stream is not None:
            if not stream.queue.full():
                stream.queue.put_nowait(nudge)
        else:
            self._ring(device_pk)
            self._deliver_offline(device_pk, nudge)

    def _ring(self, device_pk: int) -> None:
        if self.signals is not None:
            spawn(self._tasks, self.signals.ring(NUDGE_CREATED, device_pk), "ring-nudge")

    def created_elsewhere(self, device_pk: int | None) -> None:
        """Another replica stored a nudge for the device (for any device, for None): a stream
        of it open here takes its pending nudges from storage."""
        pks = list(self._streams) if device_pk is None else [device_pk]
        for pk in pks:
            if pk in self._streams:
                spawn(self._tasks, self._take_pending(pk), "nudge-from-elsewhere")

    async def _take_pending(self, device_pk: int) -> None:
        stream = self._streams.get(device_pk)
        if stream is None:
            return
        for nudge in await self.pending_for(stream.user_id, device_pk, stream.device_id):
            if self._streams.get(device_pk) is not stream or stream.queue.full():
                return  # the stream closed or is full: the nudge stays pending
            # Claimed first: a fetch, a push or another stream of the device may race us.
            if await self.mark_delivered(nudge.nudge_id, device_pk):
                stream.queue.put_nowait(nudge)

    # -- push and fetch -------------------------------------------------------------------
    async def load_push_targets(self) -> None:
        """Bring the push targets up to date: all of them at first and after a lost ring, else
        the devices rung since the last call (nothing to read: no query)."""
        if not self._push_reload and not self._push_stale and not self._push_lock.locked():
            return  # (locked: a read under way may be of a device rung just before this call)
        async with self._push_lock:
            if self._push_reload:
                self._push_reload = False
                self._push_stale.clear()
                try:
                    rows = await self._storage.push_targets()
                except BaseException:
                    self._push_reload = True  # read at the next call
                    raise
                loaded = {t.device_pk: t for t in rows}
                # A target no longer stored (removed, or its device revoked) stops counting.
                for pk in [pk for pk, o in self._offline.items() if o.push_token]:
                    if pk not in loaded:
                        self._set_push_target(pk, None)
                for pk, t in loaded.items():
                    self._set_push_target(pk, t)
            for pk in list(self._push_stale):
                self._push_stale.discard(pk)  # a ring heard during the read marks it again
                try:
                    target = await self._storage.push_target(pk)
                except BaseException:
                    self._push_stale.add(pk)
                    raise
                self._set_push_target(pk, target)

    def _set_push_target(self, device_pk: int, target: PushTargetRow | None) -> None:
        old = self._offline.get(device_pk)
        if target is not None:
            fetched_us = old.fetched_us if old is not None else 0
            self._offline[device_pk] = _Offline(
                target.user_id, target.device_id, target.kind, target.push_token, fetched_us
            )
        elif old is not None and old.fetched_us:
            self._offline[device_pk] = replace(old, push_token="")  # still fetches
        else:
            self._offline.pop(device_pk, None)

    def push_target_changed(self, device_pk: int | None) -> None:
        """Another replica set or removed the device's push target (any device's, for None:
        a ring may have been lost): read it again now, and before the next decision if that
        read fails."""
        if self._push_reload:
            return  # never read yet: the first read finds it
        if device_pk is None:
            self._push_reload = True
        else:
            self._push_stale.add(device_pk)
        spawn(self._tasks, self.load_push_targets(), "push-target-from-elsewhere")

    async def register_push_target(
        self, user_id: int, device_pk: int, device_id: str, kind: int, push_token: str
    ) -> None:
        """Make a device reachable by push (or, with an empty token, no longer); the other
        replicas are told once it is stored."""
        now = self._clock.now_us()
        async with self._push_lock:
            await self._storage.set_push_target(user_id, device_pk, push_token, now)
            target = PushTargetRow(device_pk, user_id, device_id, kind, push_token, now)
            self._set_push_target(device_pk, target if push_token else None)
        if self.signals is not None:
            spawn(
                self._tasks,
                self.signals.ring(PUSH_TARGET_CHANGED, device_pk),
                "ring-push-target",
            )

    async def fetch_pending(
        self, user_id: int, device_pk: int, device_id: str, kind: int
    ) -> list[nudges_pb2.Nudge]:
        """The device's pending nudges, each marked delivered (channel pending); the device
        counts as reachable by fetching for FETCH_REACH_US after."""
        await self.load_push_targets()
        old = self._offline.get(device_pk)
        now = self._clock.now_us()
        self._offline[device_pk] = _Offline(
            user_id, device_id, kind, old.push_token if old is not None else "", now
        )
        self._features.note_device(user_id, device_pk, kind)
        if self.reach is not None:
            self.reach.fetched(user_id, device_pk, device_id, kind, now)
        out = []
        for nudge in await self.pending_for(user_id, device_pk, device_id):
            if await self.mark_delivered(nudge.nudge_id, device_pk, "pending"):
                out.append(nudge)
        return out

    def _deliver_offline(self, device_pk: int, nudge: nudges_pb2.Nudge) -> None:
        o = self._offline.get(device_pk)
        if o is None or not o.push_token or self.push is None:
            return  # pending: the app fetches it when it wakes
        task = asyncio.get_running_loop().create_task(
            self._push(device_pk, o.push_token, nudge), name="nudge-push"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _push(self, device_pk: int, token: str, nudge: nudges_pb2.Nudge) -> None:
        assert self.push is not None
        try:
            if await self.push.push(token, nudge):
                await self.mark_delivered(nudge.nudge_id, device_pk, "push")
        except Exception:
            log.exception("push delivery failed; the nudge waits to be fetched")

    async def pending_for(
        self, user_id: int, device_pk: int, device_id: str
    ) -> list[nudges_pb2.Nudge]:
        """Undelivered, unexpired nudges routed to a device (re-sent when it reconnects)."""
        rows = await self._storage.pending(user_id, device_pk, self._clock.now_us())
        return [nudge_message(r, device_id) for r in rows]

    async def mark_delivered(self, nudge_id: str, device_pk: int, channel: str = "stream") -> bool:
        """The nudge reached the device (written to its stream, pushed, or fetched); whether
        this call delivered it (False when another path already had)."""
        return await self._storage.mark_delivered(
            nudge_id, device_pk, channel, self._clock.now_us()
        )

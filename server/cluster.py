"""What replicas of one deployment tell each other and share out: signals, shards and jobs.

One server process around SQLite is a cluster of one: `LocalCluster` delivers nothing to other
processes (there are none), holds every shard of people and runs every cluster-wide job. On
PostgreSQL, `PostgresCluster` (server/postgres_cluster.py, which alone loads the driver)
makes N replicas act as one:

* Signals: a replica that commits a low-rate change another replica must act on rings a topic
  with a key (a person, a device) on the LISTEN/NOTIFY doorbell; the other replicas read the
  data from the tables. A replica acts on its own changes in-process as it always did, so a
  ring carries its sender and a replica ignores its own. Never rung on the ingest commit path.
* Shards of people for nudge decisions (user_id % NUDGE_SHARDS), leased so that each person's
  decisions are made by one replica at a time; a dead replica's shards are taken over within
  the lease TTL plus a renewal interval, and the taker is told at once (`Shards.on_taken`), so
  its engine decides for them from then on rather than from its next periodic tick.
* Cluster-wide jobs (retention, nudge expiry and outcomes) run by the one replica holding the
  job's lease. (Training is an operator's command, `pulsesync nudges train`, run once.)
* Nudge reach: a person's device may take nudges through another replica than the one deciding
  for the person (its SubscribeNudges stream is open there, or its app fetched from there), so
  each replica records its streams and the fetches it answers in a shared record, and the
  deciding replica reads, once per tick, the devices of the people it decides for then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from pulsesync.server.nudges.shard_feed import EventFeedStorage
    from pulsesync.server.storage.postgres.pool import Connection

log = logging.getLogger(__name__)


# Topics, keyed by the id the receiving replica reads the data with.
PROFILE_CHANGED: Final = "profile_changed"  # user_id: read the new versions
CONSENT_CHANGED: Final = "consent_changed"  # user_id: read the consent ledger
DEVICE_REVOKED: Final = "device_revoked"  # device_pk: cut the device's streams
USER_ERASED: Final = "user_erased"  # user_id: cut every stream of the person
NUDGE_CREATED: Final = "nudge_created"  # device_pk: deliver its pending nudges
TOKEN_ROTATED: Final = "token_rotated"  # device_pk: forget its cached tokens
PUSH_TARGET_CHANGED: Final = "push_target_changed"  # device_pk: read its push target again
TOPICS: Final = (
    PROFILE_CHANGED,
    CONSENT_CHANGED,
    DEVICE_REVOKED,
    USER_ERASED,
    NUDGE_CREATED,
    TOKEN_ROTATED,
    PUSH_TARGET_CHANGED,
)

# Shards of people for nudge decisions: a few per replica for an even share, few enough
# that a renewal round stays one small transaction.
NUDGE_SHARDS: Final = 64
# Cluster-wide jobs; each one is a shard of the "jobs" lease group, so replicas share them out.
JOBS: Final = ("retention", "nudge-outcomes")


def shard_of(user_id: int, shards: int) -> int:
    """The shard of a person: ids are dense, so a modulo spreads them evenly."""
    return user_id % shards


# key, or None after the doorbell reconnected: "rings may have been missed, read again".
Callback = Callable[[int | None], None]
# The shards this replica has just taken (it did not hold them a moment before).
TakenCallback = Callable[[frozenset[int]], None]


class Signals(Protocol):
    async def ring(self, topic: str, key: int, *, conn: Connection | None = None) -> None:
        """Tell the other replicas that `key` changed under `topic`: within the caller's
        transaction when `conn` is given (delivered if it commits), else at once."""
        ...

    async def subscribe(self, topic: str, callback: Callback) -> Callable[[], None]:
        """Call `callback(key)` at rings of other replicas; returns the unsubscriber."""
        ...


class Shards(Protocol):
    shards: int

    async def held(self) -> dict[int, int]:
        """The shards of people this replica decides for now, each with its epoch (a new
        epoch means the shard changed hands since this replica last held it)."""
        ...

    def on_taken(self, callback: TakenCallback) -> Callable[[], None]:
        """Call `callback(shards)` as soon as this replica takes shards it did not hold (a
        dead replica's, or a leaving one's); returns the unsubscriber. Called from the
        event loop, synchronously: the callback must not block."""
        ...


@dataclass(frozen=True, slots=True)
class DeviceElsewhere:
    """A device that takes nudges through another replica: its nudge stream is open there
    (fetched_us 0), or its app fetched pending nudges at fetched_us (from any replica)."""

    user_id: int
    device_pk: int
    device_id: str
    kind: int
    fetched_us: int


class NudgeReach(Protocol):
    """The shared record of how devices take nudges, across replicas.

    The first three are called by this replica's nudge delivery and return at once (the
    record is written behind them); `elsewhere` is read once per tick by the replica deciding.
    """

    def stream_opened(self, user_id: int, device_pk: int, device_id: str, kind: int) -> None:
        """The device's SubscribeNudges stream is open here (a newer one replaced an older)."""
        ...

    def stream_closed(self, device_pk: int) -> None:
        """The device's stream here closed."""
        ...

    def fetched(self, user_id: int, device_pk: int, device_id: str, kind: int, at_us: int) -> None:
        """The device's app fetched its pending nudges here at `at_us` (the server's clock)."""
        ...

    async def elsewhere(
        self, user_ids: Collection[int], fetched_since_us: int
    ) -> list[DeviceElsewhere]:
        """The devices of these people with a stream open on another live replica, and those
        that fetched after `fetched_since_us` on any replica."""
        ...


class Cluster(Protocol):
    signals: Signals
    nudge_shards: Shards
    reach: NudgeReach
    # Where the nudge features read committed events from when any replica may have ingested
    # them; None: from this process's bus (it ingests everything).
    events: EventFeedStorage | None

    async def runs(self, job: str) -> bool:
        """Whether this replica runs the cluster-wide `job` now."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def _check_topic(topic: str) -> None:
    if topic not in TOPICS:
        raise ValueError(f"unknown cluster topic {topic!r}")


# -- one process -------------------------------------------------------------------------------
class LocalHub:
    """Processes of one Python interpreter acting as replicas (every LocalSignals on a hub
    hears the others): in a single server there is one member, so a ring reaches nobody."""

    def __init__(self) -> None:
        self.members: list[LocalSignals] = []


class LocalSignals:
    """Direct calls between the members of a hub; the sender's own callbacks are not called."""

    def __init__(self, hub: LocalHub | None = None) -> None:
        self._hub = hub or LocalHub()
        self._hub.members.append(self)
        self._callbacks: dict[str, list[Callback]] = {}

    async def ring(self, topic: str, key: int, *, conn: Connection | None = None) -> None:
        _check_topic(topic)
        for member in list(self._hub.members):
            if member is not self:
                member._call(topic, key)

    async def subscribe(self, topic: str, callback: Callback) -> Callable[[], None]:
        _check_topic(topic)
        self._callbacks.setdefault(topic, []).append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.get(topic, []).remove(callback)

        return unsubscribe

    def _call(self, topic: str, key: int | None) -> None:
        for callback in list(self._callbacks.get(topic, ())):
            try:
                callback(key)
            except Exception:
                log.exception("a cluster signal callback failed", extra={"topic": topic})


class AllShards:
    """Every shard, always, at one epoch: the only replica decides for everyone."""

    def __init__(self, shards: int = NUDGE_SHARDS) -> None:
        self.shards = shards
        self._all = dict.fromkeys(range(shards), 0)

    async def held(self) -> dict[int, int]:
        return dict(self._all)

    def on_taken(self, callback: TakenCallback) -> Callable[[], None]:
        return _no_unsubscribe  # they never change hands


def _no_unsubscribe() -> None:
    return None


class LocalReach:
    """One process: every stream is open here and every fetch is answered here, so the nudge
    delivery's own memory is the whole record and nothing is elsewhere."""

    def stream_opened(self, user_id: int, device_pk: int, device_id: str, kind: int) -> None:
        return None

    def stream_closed(self, device_pk: int) -> None:
        return None

    def fetched(self, user_id: int, device_pk: int, device_id: str, kind: int, at_us: int) -> None:
        return None

    async def elsewhere(
        self, user_ids: Collection[int], fetched_since_us: int
    ) -> list[DeviceElsewhere]:
        return []


class LocalCluster:
    """A cluster of one process (SQLite): see the module docstring."""

    def __init__(self, hub: LocalHub | None = None) -> None:
        self.signals: Signals = LocalSignals(hub)
        self.nudge_shards: Shards = AllShards()
        self.reach: NudgeReach = LocalReach()
        self.events: EventFeedStorage | None = None

    async def runs(self, job: str) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def once(
    cluster: Cluster, job: str, fn: Callable[[], Awaitable[object]]
) -> Callable[[], Awaitable[None]]:
    """`fn` as a periodic job that runs only on the replica holding the job's lease."""
    if job not in JOBS:
        raise ValueError(f"unknown cluster-wide job {job!r}")

    async def run() -> None:
        if await cluster.runs(job):
            await fn()

    return run


def spawn(tasks: set[asyncio.Task[None]], coro: Awaitable[None], name: str) -> None:
    """Run `coro` from a synchronous callback, keeping its task referenced until done."""

    async def guarded() -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("cluster signal handling failed", extra={"task": name})

    task = asyncio.get_running_loop().create_task(guarded(), name=name)
    tasks.add(task)
    task.add_done_callback(tasks.discard)

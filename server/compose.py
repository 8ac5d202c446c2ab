"""The composition root: every engine built from the storage bundle, clock, bus and config.

The server (`pulsesync.server.app`) and the offline admin commands (`pulsesync privacy ...`)
build their parts here, so bus subscriptions and erase/export hooks are wired in one visible
place (`build`), the same way for both; background work is listed with an explicit start and
stop. The cluster (`pulsesync.server.cluster`: one process on SQLite, N replicas on
PostgreSQL) is wired here too: what each engine rings to the other replicas and how it acts
on their rings, which shards of people it decides for, and which jobs run once. Servicers
only adapt the engines built here to gRPC.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pulsesync.server.background import Background, Periodic
from pulsesync.server.bus import EventBus
from pulsesync.server.clock import Clock
from pulsesync.server.cluster import (
    CONSENT_CHANGED,
    DEVICE_REVOKED,
    NUDGE_CREATED,
    PROFILE_CHANGED,
    PUSH_TARGET_CHANGED,
    TOKEN_ROTATED,
    USER_ERASED,
    Cluster,
    LocalCluster,
    Shards,
    once,
    spawn,
)
from pulsesync.server.config import ServerConfig
from pulsesync.server.context import RpcContext
from pulsesync.server.errors import Unauthenticated
from pulsesync.server.idempotency import Idempotency
from pulsesync.server.identity import IdentityStore
from pulsesync.server.metrics import Metrics
from pulsesync.server.nudges.batch_summary import COMMIT_HOOK
from pulsesync.server.nudges.catalog import load_catalog
from pulsesync.server.nudges.engine import NudgeEngine
from pulsesync.server.nudges.profiles import profile_source
from pulsesync.server.nudges.push import push_provider
from pulsesync.server.nudges.registry import MODEL_FOLDER, ModelRegistry
from pulsesync.server.nudges.shard_feed import ShardFeed
from pulsesync.server.privacy.center import PrivacyCenter
from pulsesync.server.privacy.consent import ConsentStore
from pulsesync.server.privacy.keys import RECEIPT_KEY_ENV, RECEIPT_KEY_FILE, ReceiptKey
from pulsesync.server.privacy.registry import UserDataRegistry
from pulsesync.server.privacy.retention import RetentionPolicy
from pulsesync.server.profiles.crypto import AesGcmSealer, KeyFileError, Sealer
from pulsesync.server.profiles.keys import DataKeys
from pulsesync.server.profiles.layout import UsageRanker
from pulsesync.server.profiles.store import ProfileStore
from pulsesync.server.sessions import SessionRegistry
from pulsesync.server.storage.backend import Storage
from pulsesync.server.storage.db import Database
from pulsesync.server.storage.keys import KeyVaultStorage
from pulsesync.server.storage.sqlite.profile_vault import open_vault
from pulsesync.server.storage.sqlite.profiles import SqliteProfileStorage
from pulsesync.server.timeline.ingest import IngestPipeline
from pulsesync.server.timeline.store import TimelineStore
from pulsesync.server.timeline.writer import EventWriter, GroupCommitWriter

# The name of the page-token key among the database's shared secrets.
PAGE_TOKEN_SECRET = "page-token"
# The receipt key's fingerprint (never the key) among them: see pulsesync.server.privacy.keys.
RECEIPT_KEY_FINGERPRINT = "receipt-key-fingerprint"

# Consent changes written by another process (the admin CLI) reach ingest and open
# WatchConsents streams within this; one indexed query per tick.
CONSENT_SYNC_SECONDS = 2.0


async def open_profile_store(
    config: ServerConfig, db: Database, clock: Clock, *, sealer: Sealer | None = None
) -> ProfileStore:
    """The profile store over a database: open (or create) the key vault bound to it and the
    key file, moving data keys out of a database of the previous layout, and check that both
    fit the database. `sealer` replaces AES-GCM only for the benchmark's baseline."""
    storage = SqliteProfileStorage(db)
    vault = await open_vault(config, db, clock.now_us())
    keys = await DataKeys.open(config.kek_file, vault, storage)
    return ProfileStore(storage, clock, keys, sealer or AesGcmSealer())


async def open_storage_profile_store(
    config: ServerConfig,
    storage: Storage,
    clock: Clock,
    *,
    sealer: Sealer | None = None,
    closers: list[Callable[[], Awaitable[None]]] | None = None,
) -> ProfileStore:
    """The profile store over the storage bundle's backend (see open_profile_store). On
    PostgreSQL the key vault is a PostgreSQL database of its own when --key-vault names one
    (its close is appended to closers), else a file bound to the database."""
    if storage.db is not None:
        return await open_profile_store(config, storage.db, clock, sealer=sealer)
    assert storage.pool is not None
    vault: KeyVaultStorage
    if config.vault_database is not None:
        from pulsesync.server.storage.postgres.keys import open_postgres_vault

        pg_vault = await open_postgres_vault(
            config.vault_database, storage.pool, config.store.redacted(), clock.now_us()
        )
        if closers is not None:
            closers.append(pg_vault.close)
        vault = pg_vault
    else:
        from pulsesync.server.storage.postgres.vault_binding import open_vault as open_pg_vault

        vault = await open_pg_vault(config, storage.pool, clock.now_us())
    keys = await DataKeys.open(config.kek_file, vault, storage.profiles)
    return ProfileStore(storage.profiles, clock, keys, sealer or AesGcmSealer())


@dataclass(slots=True)
class Components:
    """Everything one server (or one admin command) runs on: the shared parts, the engines
    over them and the background work, built and wired by `build`."""

    config: ServerConfig
    storage: Storage
    clock: Clock
    consent: ConsentStore
    bus: EventBus
    user_data: UserDataRegistry
    # What every RPC call shares (authentication, sessions, metrics, limits, idempotency).
    rpc: RpcContext
    profiles: ProfileStore
    nudges: NudgeEngine
    privacy: PrivacyCenter
    ingest: IngestPipeline
    timeline: TimelineStore
    # The TimelineService's reads: the standby given with --read-database, else `timeline`.
    timeline_reads: TimelineStore
    # Started in order after storage is open, stopped in reverse before it closes.
    background: list[Background] = field(default_factory=list)
    # What build opened beside storage (a PostgreSQL key vault's connections); a server closes
    # it with its background work, an admin command that starts none calls close().
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def close(self) -> None:
        """Close what build opened, for a caller that never started the background work."""
        while self.closers:
            await self.closers.pop()()

    @property
    def identity(self) -> IdentityStore:
        return self.rpc.identity

    @property
    def sessions(self) -> SessionRegistry:
        return self.rpc.sessions

    @property
    def metrics(self) -> Metrics:
        return self.rpc.metrics

    @property
    def sqlite(self) -> Database | None:
        """The SQLite database, None on PostgreSQL."""
        return self.storage.db

    @property
    def db(self) -> Database:
        """The SQLite database, for what works on the file itself; an error on PostgreSQL."""
        if self.storage.db is None:
            raise RuntimeError("this server stores its data in PostgreSQL, not a SQLite file")
        return self.storage.db


async def build(
    config: ServerConfig,
    storage: Storage,
    clock: Clock,
    *,
    profile_sealer: Sealer | None = None,
    cluster: Cluster | None = None,
) -> Components:
    """Build every engine over storage and wire them together (nothing is started). On
    PostgreSQL this server is one replica of many unless `cluster` says otherwise.
    CatalogError, before anything is opened, when the nudge catalog cannot be used."""
    catalog = load_catalog(config.nudges.catalog)
    if cluster is None:
        cluster = LocalCluster() if storage.pool is None else _postgres_cluster(config, storage)
    metrics = Metrics()
    bus = EventBus()
    user_data = UserDataRegistry()
    sessions = SessionRegistry(metrics)
    max_age = config.max_token_age_s
    identity = IdentityStore(
        storage.identity,
        clock,
        max_token_age_us=round(max_age * 1_000_000) if max_age is not None else None,
    )
    consent = ConsentStore(storage.consent, clock)
    registry = ModelRegistry(storage.models, clock)
    # Once, at the first start after an upgrade: the model folder of an earlier release (before
    # anything is opened that a refusal would have to close).
    await registry.import_folder(config.data_dir / MODEL_FOLDER)
    closers: list[Callable[[], Awaitable[None]]] = []
    profiles = await open_storage_profile_store(
        config, storage, clock, sealer=profile_sealer, closers=closers
    )
    rpc = RpcContext(
        config=config,
        sqlite=storage.db,
        clock=clock,
        identity=identity,
        sessions=sessions,
        metrics=metrics,
        idempotency=Idempotency(storage.idempotency, clock),
        page_token_secret=await storage.identity.shared_secret(
            PAGE_TOKEN_SECRET, secrets.token_bytes(32)
        ),
    )
    timeline = TimelineStore(storage.timeline)
    timeline_reads = (
        timeline if storage.timeline_reads is None else TimelineStore(storage.timeline_reads)
    )
    nudges = NudgeEngine(
        storage.nudges,
        clock=clock,
        consent=consent,
        timeline=timeline,
        catalog=catalog,
        profiles=profile_source(profiles, catalog.policy),
        registry=registry,
        push=push_provider(config.nudges),
        decision_seconds=metrics.nudge_decision,
        seed=config.nudges.seed,
        shards=cluster.nudge_shards,
    )
    privacy = PrivacyCenter(
        storage.privacy,
        clock=clock,
        identity=identity,
        consent=consent,
        sessions=sessions,
        hooks=user_data,
        policy=RetentionPolicy.from_config(config),
        key=await _shared_receipt_key(config, storage),
    )
    ingest = IngestPipeline(
        event_writer(storage, metrics), consent=consent, bus=bus, metrics=metrics
    )
    layout = UsageRanker(profiles, storage.profiles, consent)
    profiles.layout = layout

    # -- wiring: every bus subscription and erase/export hook ------------------------------
    bus.subscribe(layout.on_events)
    if cluster.events is None:
        bus.subscribe(nudges.feed.on_events)
    else:  # any replica may have ingested them: read from the committed change feed
        nudges.pull = ShardFeed(cluster.events, cluster.nudge_shards, nudges.feed, clock).pull
    user_data.on_erase("profiles", profiles.erase_user)
    user_data.add_exporter("profile", profiles.export_user)
    user_data.on_erase("nudges", nudges.erase_user)
    user_data.on_erase("ingest", ingest.forget_user)

    wiring = _ClusterWiring(cluster, identity, sessions, consent, profiles, nudges)
    background = [
        *(Background("key-vault", _no_op, close) for close in closers),  # stopped last
        Background("cluster", wiring.start, wiring.stop),
        Background("ingest-writer", ingest.start, ingest.stop),
        Background("profile-layout", _started(layout.start), layout.stop),
        Periodic(
            "privacy-retention",
            privacy.policy.sweep_seconds,
            once(cluster, "retention", privacy.purge_expired),
        ).background(),
        Periodic("privacy-consent-sync", CONSENT_SYNC_SECONDS, consent.sync_external).background(),
        Background("nudge-engine", _no_op, _stopped(nudges.close)),
    ]
    if config.nudges.scheduler != "manual":  # a simulation ticks itself on its fake clock
        background += [
            # Listening before the first periodic tick, so no takeover falls between them.
            _TakeoverTicks(cluster.nudge_shards, nudges).background(),
            Periodic("nudge-ticks", config.nudges.tick_seconds, nudges.tick).background(),
        ]
    return Components(
        config,
        storage,
        clock,
        consent,
        bus,
        user_data,
        rpc,
        profiles,
        nudges,
        privacy,
        ingest,
        timeline,
        timeline_reads,
        background,
        closers,
    )


async def _shared_receipt_key(config: ServerConfig, storage: Storage) -> ReceiptKey:
    """The receipt key; on PostgreSQL, checked to be the one every other replica uses (on
    SQLite every process reads the one file beside the database)."""
    key = ReceiptKey.load(config.data_dir / RECEIPT_KEY_FILE)
    if storage.pool is None:
        return key
    first = await storage.identity.shared_secret(
        RECEIPT_KEY_FINGERPRINT, key.fingerprint().encode()
    )
    if first.decode() != key.fingerprint():
        raise KeyFileError(
            f"this server's receipt key ({config.data_dir / RECEIPT_KEY_FILE}, or "
            f"{RECEIPT_KEY_ENV}) is not the one the other servers over this database use: "
            "give every replica the same receipt key file, or its content in "
            f'{RECEIPT_KEY_ENV} (docs/scaling.md, "The receipt key")'
        )
    return key


def event_writer(storage: Storage, metrics: Metrics) -> EventWriter:
    """The backend's ingest writer: the SQLite writer process, or group commit by binary COPY
    on PostgreSQL; both run the nudges' commit hook on every committed batch."""
    if storage.pool is not None:
        # Imported here, as in open_storage: a SQLite server never loads the PostgreSQL driver.
        from pulsesync.server.storage.postgres.ingest_writer import PostgresIngestWriter

        return PostgresIngestWriter(storage.pool, COMMIT_HOOK, metrics.ingest_commits.inc)
    assert storage.db is not None
    return GroupCommitWriter(storage.db, COMMIT_HOOK, metrics.ingest_commits.inc)


def _postgres_cluster(config: ServerConfig, storage: Storage) -> Cluster:
    """This replica among the others over the same PostgreSQL: rings on the doorbell, nudge
    shards and jobs by lease, features from the events table."""
    from pulsesync.server.postgres_cluster import PostgresCluster

    dsn = config.store.dsn
    assert storage.pool is not None
    assert dsn is not None
    return PostgresCluster(storage.pool, dsn)


class _ClusterWiring:
    """What this replica rings to the others, and what it does at their rings."""

    def __init__(
        self,
        cluster: Cluster,
        identity: IdentityStore,
        sessions: SessionRegistry,
        consent: ConsentStore,
        profiles: ProfileStore,
        nudges: NudgeEngine,
    ) -> None:
        self.cluster = cluster
        self._identity = identity
        self._sessions = sessions
        self._consent = consent
        self._profiles = profiles
        self._nudges = nudges
        self._tasks: set[asyncio.Task[None]] = set()
        self._unsubscribe: list[Callable[[], None]] = []

    async def start(self) -> None:
        cluster = self.cluster
        signals = cluster.signals
        await cluster.start()
        # The consent ledger cursor first, so that the first ring reads from here on.
        await self._consent.sync_external()
        for topic, callback in (
            (PROFILE_CHANGED, self._profiles.changed_elsewhere),
            (CONSENT_CHANGED, self._consent_changed),
            (DEVICE_REVOKED, self._device_revoked),
            (USER_ERASED, self._user_erased),
            (NUDGE_CREATED, self._nudges.delivery.created_elsewhere),
            (TOKEN_ROTATED, self._token_rotated),
            (PUSH_TARGET_CHANGED, self._nudges.delivery.push_target_changed),
        ):
            self._unsubscribe.append(await signals.subscribe(topic, callback))
        # Rung after each commit made here (never on the ingest path).
        self._unsubscribe.append(
            self._profiles.on_commit(lambda user_id, _p: self._ring(PROFILE_CHANGED, user_id))
        )
        self._consent.on_change = lambda user_id: self._ring(CONSENT_CHANGED, user_id)
        self._identity.on_token_rotated = lambda device_pk: self._ring(TOKEN_ROTATED, device_pk)
        self._sessions.signals = signals
        self._nudges.delivery.signals = signals
        self._nudges.delivery.reach = cluster.reach
        self._nudges.runs_outcomes = lambda: cluster.runs("nudge-outcomes")

    async def stop(self) -> None:
        self._consent.on_change = None
        self._identity.on_token_rotated = None
        self._sessions.signals = None
        self._nudges.delivery.signals = None
        self._nudges.delivery.reach = None
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        for task in list(self._tasks):
            task.cancel()
        await self.cluster.stop()

    def _ring(self, topic: str, key: int) -> None:
        spawn(self._tasks, self.cluster.signals.ring(topic, key), f"ring-{topic}")

    def _consent_changed(self, _user_id: int | None) -> None:
        # The ledger is read from the last entry seen: a ring heard twice, or one for an
        # entry the periodic sync already applied, changes nothing twice.
        spawn(self._tasks, _ignore(self._consent.sync_external()), "consent-from-elsewhere")

    def _device_revoked(self, device_pk: int | None) -> None:
        if device_pk is None:
            return  # a lost ring: the revocation sweep (app.py) finds it
        self._identity.forget_device(device_pk)
        self._sessions.cut_off_device(device_pk, local_only=True)

    def _token_rotated(self, device_pk: int | None) -> None:
        # Read again from storage at the device's next call: a replaced token is refused
        # there (TOKEN_UNKNOWN, or TOKEN_ROTATED after its grace period). A lost ring leaves
        # a cached entry for at most TOKEN_CACHE_US.
        if device_pk is not None:
            self._identity.forget_device(device_pk)

    def _user_erased(self, user_id: int | None) -> None:
        if user_id is None:
            return  # as above
        self._identity.forget_user(user_id)
        self._consent.forget_user(user_id)
        self._sessions.cut_off_user(user_id, _erased(), local_only=True)


class _TakeoverTicks:
    """A nudge tick as soon as this replica takes shards it did not hold (a dead replica's),
    so decisions for their people resume then, not at the next periodic tick (up to
    `nudges.tick_seconds` later). The engine runs ticks one at a time."""

    def __init__(self, shards: Shards, nudges: NudgeEngine) -> None:
        self._shards = shards
        self._nudges = nudges
        self._tasks: set[asyncio.Task[None]] = set()
        self._unsubscribe: Callable[[], None] | None = None

    def background(self) -> Background:
        return Background("nudge-takeover-ticks", self.start, self.stop)

    async def start(self) -> None:
        self._unsubscribe = self._shards.on_taken(self._taken)

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _taken(self, shards: frozenset[int]) -> None:
        spawn(self._tasks, _ignore(self._nudges.take_over(shards)), "nudge-takeover-tick")


def _erased() -> Unauthenticated:
    return Unauthenticated(
        "this person's data was erased; pair the device again to start over",
        reason="USER_ERASED",
    )


async def _ignore(aw: Awaitable[object]) -> None:
    await aw


async def _no_op() -> None:
    return None


def _started(fn: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def start() -> None:
        fn()

    return start


def _stopped(fn: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def stop() -> None:
        fn()

    return stop

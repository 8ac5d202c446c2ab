"""The composition root: every engine built from the storage bundle, clock, bus and config.

The server (`pulsesync.server.app`) and the offline admin commands (`pulsesync privacy ...`)
build their parts here, so bus subscriptions and erase/export hooks are wired in one visible
place (`build`), the same way for both; background work is listed with an explicit start and
stop. Servicers only adapt the engines built here to gRPC.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pulsesync.server.background import Background, Periodic
from pulsesync.server.bus import EventBus
from pulsesync.server.clock import Clock
from pulsesync.server.config import ServerConfig
from pulsesync.server.context import AppContext
from pulsesync.server.idempotency import Idempotency
from pulsesync.server.identity import IdentityStore
from pulsesync.server.metrics import Metrics
from pulsesync.server.nudges.batch_summary import COMMIT_HOOK
from pulsesync.server.nudges.catalog import load_catalog
from pulsesync.server.nudges.engine import NudgeEngine
from pulsesync.server.nudges.profiles import profile_source
from pulsesync.server.nudges.push import push_provider
from pulsesync.server.nudges.registry import ModelRegistry
from pulsesync.server.privacy.center import PrivacyCenter
from pulsesync.server.privacy.consent import ConsentStore
from pulsesync.server.privacy.keys import RECEIPT_KEY_FILE, ReceiptKey
from pulsesync.server.privacy.registry import UserDataRegistry
from pulsesync.server.privacy.retention import RetentionPolicy
from pulsesync.server.profiles.crypto import AesGcmSealer, Sealer
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
    """Everything one server (or one admin command) runs on."""

    app: AppContext
    profiles: ProfileStore
    nudges: NudgeEngine
    privacy: PrivacyCenter
    ingest: IngestPipeline
    timeline: TimelineStore
    # Started in order after storage is open, stopped in reverse before it closes.
    background: list[Background] = field(default_factory=list)


async def build(
    config: ServerConfig,
    storage: Storage,
    clock: Clock,
    *,
    profile_sealer: Sealer | None = None,
) -> Components:
    """Build every engine over storage and wire them together (nothing is started)."""
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
    closers: list[Callable[[], Awaitable[None]]] = []
    profiles = await open_storage_profile_store(
        config, storage, clock, sealer=profile_sealer, closers=closers
    )
    app = AppContext(
        config=config,
        sqlite=storage.db,
        storage=storage,
        clock=clock,
        identity=identity,
        sessions=sessions,
        metrics=metrics,
        consent=consent,
        bus=bus,
        user_data=user_data,
        profiles=profiles,
        idempotency=Idempotency(storage.idempotency, clock),
    )
    timeline = TimelineStore(storage.timeline)
    catalog = load_catalog(config.nudges.catalog)
    nudges = NudgeEngine(
        storage.nudges,
        clock=clock,
        consent=consent,
        timeline=timeline,
        catalog=catalog,
        profiles=profile_source(app, catalog.policy),
        registry=ModelRegistry(config.data_dir / "nudge_models"),
        push=push_provider(config.nudges),
        decision_seconds=metrics.nudge_decision,
        seed=config.nudges.seed,
    )
    privacy = PrivacyCenter(
        storage.privacy,
        clock=clock,
        identity=identity,
        consent=consent,
        sessions=sessions,
        hooks=user_data,
        policy=RetentionPolicy.from_config(config),
        key=ReceiptKey.load_or_create(config.data_dir / RECEIPT_KEY_FILE),
    )
    ingest = IngestPipeline(
        event_writer(storage, metrics), consent=consent, bus=bus, metrics=metrics
    )
    layout = UsageRanker(profiles, storage.profiles, consent)
    profiles.layout = layout

    # -- wiring: every bus subscription and erase/export hook ------------------------------
    bus.subscribe(layout.on_events)
    bus.subscribe(nudges.feed.on_events)
    user_data.on_erase("profiles", profiles.erase_user)
    user_data.add_exporter("profile", profiles.export_user)
    user_data.on_erase("nudges", nudges.erase_user)
    user_data.on_erase("ingest", ingest.forget_user)

    background = [
        *(Background("key-vault", _no_op, close) for close in closers),  # stopped last
        Background("ingest-writer", ingest.start, ingest.stop),
        Background("profile-layout", _started(layout.start), layout.stop),
        Periodic(
            "privacy-retention", privacy.policy.sweep_seconds, privacy.purge_expired
        ).background(),
        Periodic("privacy-consent-sync", CONSENT_SYNC_SECONDS, consent.sync_external).background(),
        Background("nudge-engine", _no_op, _stopped(nudges.close)),
    ]
    if config.nudges.scheduler != "manual":  # a simulation ticks itself on its fake clock
        background.append(
            Periodic("nudge-ticks", config.nudges.tick_seconds, nudges.tick).background()
        )
    return Components(app, profiles, nudges, privacy, ingest, timeline, background)


def event_writer(storage: Storage, metrics: Metrics) -> EventWriter:
    """The backend's ingest writer: the SQLite writer process, or group commit by binary COPY
    on PostgreSQL; both run the nudges' commit hook on every committed batch."""
    if storage.pool is not None:
        # Imported here, as in open_storage: a SQLite server never loads the PostgreSQL driver.
        from pulsesync.server.storage.postgres.ingest_writer import PostgresIngestWriter

        return PostgresIngestWriter(storage.pool, COMMIT_HOOK, metrics.ingest_commits.inc)
    assert storage.db is not None
    return GroupCommitWriter(storage.db, COMMIT_HOOK, metrics.ingest_commits.inc)


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

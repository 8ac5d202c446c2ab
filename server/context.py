"""What the RPC layer shares: authentication (identity), sessions, metrics and heavy-read slots
for every call, plus the parts the ingest pipeline takes. Built by the composition root
(`pulsesync.server.compose.build`); engines receive only the parts they use, not this."""

from __future__ import annotations

from dataclasses import dataclass, field

from pulsesync.server.bus import EventBus
from pulsesync.server.clock import Clock
from pulsesync.server.config import ServerConfig
from pulsesync.server.idempotency import Idempotency
from pulsesync.server.identity import IdentityStore
from pulsesync.server.limits import HeavyReads
from pulsesync.server.metrics import Metrics
from pulsesync.server.privacy.consent import ConsentStore
from pulsesync.server.privacy.registry import UserDataRegistry
from pulsesync.server.profiles.store import ProfileStore
from pulsesync.server.sessions import SessionRegistry
from pulsesync.server.storage.backend import Storage
from pulsesync.server.storage.db import Database


@dataclass(slots=True)
class AppContext:
    """The server's shared parts, built once in `pulsesync.server.compose`."""

    config: ServerConfig
    # The SQLite database (None on PostgreSQL): damage and full-disk checks look at it.
    sqlite: Database | None
    storage: Storage
    clock: Clock
    identity: IdentityStore
    sessions: SessionRegistry
    metrics: Metrics
    consent: ConsentStore
    bus: EventBus
    user_data: UserDataRegistry
    # Merged, encrypted profiles: `await profiles.get(user_id)` -> pulsesync.v1.Profile.
    profiles: ProfileStore
    # First answers of calls with a request_id, for their retries (AIP-155).
    idempotency: Idempotency
    # The secret page tokens are sealed under (pulsesync.server.rpc.pagination): kept in the
    # database, so a token from one replica is good on every other.
    page_token_secret: bytes
    # Heavy reads in flight per device (see pulsesync.server.limits).
    heavy_reads: HeavyReads = field(default_factory=HeavyReads)

    @property
    def db(self) -> Database:
        """The SQLite database, for what works on the file itself; an error on PostgreSQL."""
        if self.sqlite is None:
            raise RuntimeError("this server stores its data in PostgreSQL, not a SQLite file")
        return self.sqlite

"""What every RPC call shares: authentication (identity), sessions, metrics, heavy-read slots,
idempotency, the clock and the configuration. Built by the composition root
(`pulsesync.server.compose.build`) and given to every servicer beside the one engine it adapts;
engines never see it."""

from __future__ import annotations

from dataclasses import dataclass, field

from pulsesync.server.clock import Clock
from pulsesync.server.config import ServerConfig
from pulsesync.server.idempotency import Idempotency
from pulsesync.server.identity import IdentityStore
from pulsesync.server.limits import HeavyReads
from pulsesync.server.metrics import Metrics
from pulsesync.server.sessions import SessionRegistry
from pulsesync.server.storage.db import Database


@dataclass(slots=True)
class RpcContext:
    """The per-call plumbing of the rpc layer (`pulsesync.server.rpc.base`)."""

    config: ServerConfig
    # The SQLite database (None on PostgreSQL): every call first checks it was not found damaged.
    sqlite: Database | None
    clock: Clock
    identity: IdentityStore
    sessions: SessionRegistry
    metrics: Metrics
    # First answers of calls with a request_id, for their retries (AIP-155).
    idempotency: Idempotency
    # The secret page tokens are sealed under (pulsesync.server.rpc.pagination): kept in the
    # database, so a token from one replica is good on every other.
    page_token_secret: bytes
    # Heavy reads in flight per device (see pulsesync.server.limits).
    heavy_reads: HeavyReads = field(default_factory=HeavyReads)

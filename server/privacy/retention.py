"""Retention: raw events older than the configured age are deleted on a schedule.

Raw events (the `events` table) and quarantined submissions (`quarantine`) are the detailed
record of what a person did; they are kept for `retention_days` (default 400: a full year for
year-over-year views plus a month of slack for late uploads) and then deleted in small
transactions so ingest never waits long. Aggregates computed from them may stay, under the
person's consent, until erasure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

from pulsesync.server.config import (
    DEFAULT_RETENTION_DAYS,
    DEFAULT_RETENTION_SWEEP_SECONDS,
    ServerConfig,
)
from pulsesync.server.errors import InvalidArgument
from pulsesync.server.storage.privacy import PrivacyStorage

log = logging.getLogger(__name__)

# Rows per delete transaction: short enough (a few ms) that ingest commits interleave.
PURGE_CHUNK_ROWS: Final = 2000
DAY_US: Final = 86_400 * 1_000_000


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long raw events are kept and how often expired ones are swept."""

    raw_event_days: int = DEFAULT_RETENTION_DAYS
    sweep_seconds: float = DEFAULT_RETENTION_SWEEP_SECONDS

    def __post_init__(self) -> None:
        if self.raw_event_days < 1:
            raise InvalidArgument(
                "retention must be at least 1 day (PULSESYNC_RETENTION_DAYS)",
                reason="INVALID_RETENTION",
            )
        if self.sweep_seconds <= 0:
            raise InvalidArgument(
                "retention sweep interval must be positive (PULSESYNC_RETENTION_SWEEP_SECONDS)",
                reason="INVALID_RETENTION",
            )

    @property
    def raw_event_us(self) -> int:
        return self.raw_event_days * DAY_US

    @classmethod
    def from_config(cls, config: ServerConfig) -> RetentionPolicy:
        """The policy of config.retention (checked: at least a day, a positive interval)."""
        return cls(config.retention.raw_event_days, config.retention.sweep_seconds)


async def purge_expired(
    storage: PrivacyStorage, now_us: int, policy: RetentionPolicy
) -> dict[str, int]:
    """Delete raw events and quarantine entries older than the policy allows; rows deleted."""
    cutoff = now_us - policy.raw_event_us
    events = 0
    for user_id in await storage.user_ids():
        while True:
            n = await storage.delete_events_before(user_id, cutoff, PURGE_CHUNK_ROWS)
            events += n
            if n < PURGE_CHUNK_ROWS:
                break
    quarantined = 0
    while True:
        n = await storage.delete_quarantine_before(cutoff, PURGE_CHUNK_ROWS)
        quarantined += n
        if n < PURGE_CHUNK_ROWS:
            break
    return {"events": events, "quarantine": quarantined}

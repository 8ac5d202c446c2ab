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

from pulsesync.server.config import ServerConfig, env
from pulsesync.server.errors import InvalidArgument
from pulsesync.server.storage.privacy import PrivacyStorage

log = logging.getLogger(__name__)

DEFAULT_RETENTION_DAYS: Final = 400
# An hour between sweeps: expiry is measured in days, so an hour late costs nothing, and a
# sweep of a quiet database is a handful of indexed queries.
DEFAULT_SWEEP_SECONDS: Final = 3600.0
# Rows per delete transaction: short enough (a few ms) that ingest commits interleave.
PURGE_CHUNK_ROWS: Final = 2000
DAY_US: Final = 86_400 * 1_000_000


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long raw events are kept and how often expired ones are swept."""

    raw_event_days: int = DEFAULT_RETENTION_DAYS
    sweep_seconds: float = DEFAULT_SWEEP_SECONDS

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
        """From config.extra ("retention_days", "retention_sweep_seconds"), then env, then defaults."""
        days = config.extra.get("retention_days") or env("RETENTION_DAYS")
        sweep = config.extra.get("retention_sweep_seconds") or env("RETENTION_SWEEP_SECONDS")
        try:
            return cls(
                int(days) if days else DEFAULT_RETENTION_DAYS,
                float(sweep) if sweep else DEFAULT_SWEEP_SECONDS,
            )
        except ValueError:
            raise InvalidArgument(
                f"retention settings must be numbers (got days={days!r}, sweep={sweep!r})",
                reason="INVALID_RETENTION",
            ) from None


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

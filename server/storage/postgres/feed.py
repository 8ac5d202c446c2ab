"""Committed events read back for the replica deciding a shard of people, whoever ingested them.

The per-person change feed (`event_changes`, numbered per person by `timeline_heads` in commit
order) is the durable cursor: a replica folding a person's events into the nudge features
remembers the last change it folded, and reads the changes after it. A replica that takes a
person over starts from a window of recent events, up to the head it read first, so no event
is folded twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from pulsesync.server.bus import CommittedEvent
from pulsesync.server.storage.postgres.pool import PostgresPool

_COLUMNS = "e.user_id, e.device_pk, e.seq, e.t_us, e.kind, e.body, e.received_us"


def _event(r: asyncpg.Record) -> CommittedEvent:
    return CommittedEvent(
        int(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]), bytes(r[5]), int(r[6])
    )


class PostgresEventFeed:
    """Heads and changes of the change feed, for the people of some shards."""

    def __init__(self, pool: PostgresPool) -> None:
        self._pool = pool

    async def heads(self, shards: Sequence[int], of: int) -> dict[int, int]:
        """The last change of every person in these shards (user_id % of)."""
        rows = await self._pool.fetch(
            "SELECT user_id, last_change_id FROM timeline_heads"
            " WHERE (user_id % $2)::integer = ANY($1::integer[])",
            list(shards),
            of,
        )
        return {int(r["user_id"]): int(r["last_change_id"]) for r in rows}

    async def changes_after(self, user_id: int, after: int, upto: int) -> list[CommittedEvent]:
        """The person's events committed in changes (after, upto], in commit order."""
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM event_changes c JOIN events e"
            " ON e.user_id = c.user_id AND e.device_pk = c.device_pk"
            " AND e.seq BETWEEN c.seq_low AND c.seq_high"
            " WHERE c.user_id = $1 AND c.change_id > $2 AND c.change_id <= $3"
            " ORDER BY c.change_id, e.seq",
            user_id,
            after,
            upto,
        )
        return [_event(r) for r in rows]

    async def recent(self, user_id: int, since_t_us: int, upto: int) -> list[CommittedEvent]:
        """The person's events at or after since_t_us committed in changes up to `upto`."""
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM event_changes c JOIN events e"
            " ON e.user_id = c.user_id AND e.device_pk = c.device_pk"
            " AND e.seq BETWEEN c.seq_low AND c.seq_high"
            " WHERE c.user_id = $1 AND c.change_id <= $2 AND e.t_us >= $3"
            " ORDER BY c.change_id, e.seq",
            user_id,
            upto,
            since_t_us,
        )
        return [_event(r) for r in rows]

"""The privacy summary: what is held about a person, per consent category."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Final

import aiosqlite

from pulsesync.kinds import CATEGORY_OF_KIND
from pulsesync.server.privacy.consent import CATEGORIES, ConsentState
from pulsesync.server.privacy.tables import USER_COLUMN, UserTable, quote, user_tables
from pulsesync.v1 import common_pb2

# Tables that record nudges sent, in order of preference, and the column marking delivery.
_NUDGE_TABLES: Final = ("nudges", "nudge_deliveries", "nudge_decisions")
_DELIVERY_COLUMNS: Final = ("delivered_us", "deliver_us", "sent_us", "send_us")
# Record types that belong to the cross-device sync category (the profile).
_SYNC_PREFIX: Final = "profile"


@dataclass(frozen=True, slots=True)
class CategoryStats:
    category: int
    record_count: int = 0
    first_us: int | None = None
    last_us: int | None = None
    device_ids: tuple[str, ...] = ()
    retention_us: int | None = None


@dataclass(frozen=True, slots=True)
class PrivacySummary:
    """Counts, spans, devices and consents for one person."""

    user_name: str
    categories: tuple[CategoryStats, ...]
    consents: tuple[ConsentState, ...]
    nudges_sent: int
    device_count: int
    last_activity_us: int | None
    record_counts: dict[str, int] = field(default_factory=dict)


async def _count(conn: aiosqlite.Connection, table: UserTable, user_id: int) -> int:
    async with conn.execute(
        f"SELECT COUNT(*) FROM {quote(table.name)} WHERE {USER_COLUMN} = ?", (user_id,)
    ) as c:
        row = await c.fetchone()
    return int(row[0]) if row else 0


async def _nudges_sent(conn: aiosqlite.Connection, tables: list[UserTable], user_id: int) -> int:
    by_name = {t.name: t for t in tables}
    for name in _NUDGE_TABLES:
        table = by_name.get(name)
        if table is None:
            continue
        column = next((c for c in _DELIVERY_COLUMNS if table.has(c)), None)
        where = f" AND {quote(column)} IS NOT NULL" if column else ""
        async with conn.execute(
            f"SELECT COUNT(*) FROM {quote(name)} WHERE {USER_COLUMN} = ?{where}", (user_id,)
        ) as c:
            row = await c.fetchone()
        return int(row[0]) if row else 0
    return 0


async def summarize(
    conn: aiosqlite.Connection,
    user_id: int,
    user_name: str,
    consents: tuple[ConsentState, ...],
    raw_retention_us: int,
) -> PrivacySummary:
    """Build the summary from the database (reads only)."""
    counts: dict[int, int] = defaultdict(int)
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    devices: dict[int, set[int]] = defaultdict(set)
    async with conn.execute(
        "SELECT kind, device_pk, COUNT(*), MIN(t_us), MAX(t_us) FROM events"
        " WHERE user_id = ? GROUP BY kind, device_pk",
        (user_id,),
    ) as c:
        for kind, device_pk, n, lo, hi in await c.fetchall():
            cat = CATEGORY_OF_KIND.get(int(kind), common_pb2.CONSENT_CATEGORY_UNSPECIFIED)
            counts[cat] += int(n)
            first[cat] = min(first.get(cat, lo), lo)
            last[cat] = max(last.get(cat, hi), hi)
            devices[cat].add(int(device_pk))
    async with conn.execute(
        "SELECT device_pk, device_id, last_seen_us FROM devices WHERE user_id = ?", (user_id,)
    ) as c:
        device_rows = list(await c.fetchall())
    device_ids = {int(r[0]): str(r[1]) for r in device_rows}

    tables = await user_tables(conn)
    record_counts = {t.name: await _count(conn, t, user_id) for t in tables}
    sync_records = sum(n for name, n in record_counts.items() if name.startswith(_SYNC_PREFIX))

    stats: list[CategoryStats] = []
    for cat in CATEGORIES:
        if cat == common_pb2.CONSENT_CATEGORY_SYNC:
            stats.append(CategoryStats(cat, sync_records))
            continue
        stats.append(
            CategoryStats(
                cat,
                counts.get(cat, 0),
                first.get(cat),
                last.get(cat),
                tuple(sorted(device_ids.get(pk, f"#{pk}") for pk in devices.get(cat, ()))),
                raw_retention_us,
            )
        )
    seen = [int(r[2]) for r in device_rows if r[2] is not None]
    activity = [*last.values(), *seen]
    return PrivacySummary(
        user_name=user_name,
        categories=tuple(stats),
        consents=consents,
        nudges_sent=await _nudges_sent(conn, tables, user_id),
        device_count=len(device_rows),
        last_activity_us=max(activity) if activity else None,
        record_counts=record_counts,
    )

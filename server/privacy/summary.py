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
# Record types (tables) held for a consent category besides events, with the columns giving
# each row's time and device. Events are classed by kind (CATEGORY_OF_KIND); these tables by what
# they are: what the nudge policy decided, sent and heard back is personalization; the profile
# versions and the usage behind the adaptive layout exist to sync a person's devices.
_PERSONALIZATION: Final = common_pb2.CONSENT_CATEGORY_PERSONALIZATION
_SYNC: Final = common_pb2.CONSENT_CATEGORY_SYNC


@dataclass(frozen=True, slots=True)
class _HeldTable:
    category: int
    time_column: str
    device_column: str | None  # device_pk (INTEGER) or device_id (TEXT)


CATEGORY_OF_TABLE: Final[dict[str, _HeldTable]] = {
    "nudge_decisions": _HeldTable(_PERSONALIZATION, "decision_us", None),
    "nudges": _HeldTable(_PERSONALIZATION, "create_us", "device_pk"),
    "nudge_feedback": _HeldTable(_PERSONALIZATION, "action_us", "device_pk"),
    "profile_versions": _HeldTable(_SYNC, "create_us", "device_id"),
    "profile_feature_usage": _HeldTable(_SYNC, "ref_us", None),
}
# Profile versions the server itself wrote (the adaptive layout) name this instead of a device.
_SERVER_WRITER: Final = "server"


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
    # The person's own activity: events and device contact (not the server's nudge decisions).
    event_last = list(last.values())

    tables = await user_tables(conn)
    record_counts = {t.name: await _count(conn, t, user_id) for t in tables}
    device_names: dict[int, set[str]] = defaultdict(set)
    present = {t.name: t for t in tables}
    for name, held in CATEGORY_OF_TABLE.items():
        table = present.get(name)
        if table is None or not table.has(held.time_column):
            continue
        device = quote(held.device_column) if held.device_column else "NULL"
        async with conn.execute(
            f"SELECT {device}, COUNT(*), MIN({quote(held.time_column)}),"
            f" MAX({quote(held.time_column)}) FROM {quote(name)}"
            f" WHERE {USER_COLUMN} = ? GROUP BY 1",
            (user_id,),
        ) as c:
            for dev, n, lo, hi in await c.fetchall():
                cat = held.category
                counts[cat] += int(n)
                first[cat] = min(first.get(cat, lo), lo)
                last[cat] = max(last.get(cat, hi), hi)
                if isinstance(dev, int):
                    devices[cat].add(dev)
                elif isinstance(dev, str) and dev != _SERVER_WRITER:
                    device_names[cat].add(dev)

    stats: list[CategoryStats] = []
    for cat in CATEGORIES:
        names = device_names.get(cat, set())
        names |= {device_ids.get(pk, f"#{pk}") for pk in devices.get(cat, ())}
        stats.append(
            CategoryStats(
                cat,
                counts.get(cat, 0),
                first.get(cat),
                last.get(cat),
                tuple(sorted(names)),
                # Retention applies to raw events; the profile is kept until erased.
                None if cat == _SYNC else raw_retention_us,
            )
        )
    seen = [int(r[2]) for r in device_rows if r[2] is not None]
    activity = [*event_last, *seen]
    return PrivacySummary(
        user_name=user_name,
        categories=tuple(stats),
        consents=consents,
        nudges_sent=await _nudges_sent(conn, tables, user_id),
        device_count=len(device_rows),
        last_activity_us=max(activity) if activity else None,
        record_counts=record_counts,
    )

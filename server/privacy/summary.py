"""The privacy summary: what is held about a person, per consent category."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Final

from pulsesync.kinds import CATEGORY_OF_KIND
from pulsesync.server.privacy.consent import CATEGORIES, ConsentState
from pulsesync.server.storage.privacy import HeldTable, PrivacyStorage
from pulsesync.v1 import common_pb2

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


async def summarize(
    storage: PrivacyStorage,
    user_id: int,
    user_name: str,
    consents: tuple[ConsentState, ...],
    raw_retention_us: int,
) -> PrivacySummary:
    """Build the summary from storage (reads only)."""
    counts: dict[int, int] = defaultdict(int)
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    devices: dict[int, set[int]] = defaultdict(set)
    rows = await storage.summary_rows(
        user_id,
        [HeldTable(name, h.time_column, h.device_column) for name, h in CATEGORY_OF_TABLE.items()],
    )
    for g in rows.events:
        cat = CATEGORY_OF_KIND.get(g.kind, common_pb2.CONSENT_CATEGORY_UNSPECIFIED)
        counts[cat] += g.count
        first[cat] = min(first.get(cat, g.first_us), g.first_us)
        last[cat] = max(last.get(cat, g.last_us), g.last_us)
        devices[cat].add(g.device_pk)
    device_ids = {d.device_pk: d.device_id for d in rows.devices}
    # The person's own activity: events and device contact (not the server's nudge decisions).
    event_last = list(last.values())
    device_names: dict[int, set[str]] = defaultdict(set)
    for h in rows.held:
        cat = CATEGORY_OF_TABLE[h.table].category
        counts[cat] += h.count
        first[cat] = min(first.get(cat, h.first_us), h.first_us)
        last[cat] = max(last.get(cat, h.last_us), h.last_us)
        if isinstance(h.device, int):
            devices[cat].add(h.device)
        elif isinstance(h.device, str) and h.device != _SERVER_WRITER:
            device_names[cat].add(h.device)

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
    seen = [d.last_seen_us for d in rows.devices if d.last_seen_us is not None]
    activity = [*event_last, *seen]
    return PrivacySummary(
        user_name=user_name,
        categories=tuple(stats),
        consents=consents,
        nudges_sent=rows.nudges_sent,
        device_count=len(rows.devices),
        last_activity_us=max(activity) if activity else None,
        record_counts=rows.record_counts,
    )

"""The steps-in-30-minutes outcome computed from the stored timeline is exact, and two devices
counting the same walk count it once."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from pulsesync.kinds import kind_of
from pulsesync.server.storage.db import Database
from pulsesync.server.storage.sqlite.timeline import SqliteTimelineStorage
from pulsesync.server.timeline.steps import steps_in_window
from pulsesync.server.timeline.store import TimelineStore
from tests.server.nudges.support import app_event, steps_event

MIN = 60_000_000
T0 = 1_767_225_600_000_000
WINDOW = 30 * MIN


async def _check(events: list[tuple[int, int, int, int, bool]], start_off: int) -> int:
    """events: (user, device of that user 0/1, offset s, count, is steps); user 1's steps in the window."""
    with tempfile.TemporaryDirectory() as tmp:
        db = await Database.open(Path(tmp) / "t.db")
        try:
            async with db.transaction() as tx:
                for uid in (1, 2):
                    await tx.execute(
                        "INSERT INTO users (user_id, name, create_us) VALUES (?, ?, 0)",
                        (uid, f"u{uid}"),
                    )
                    for dev in (0, 1):
                        pk = 2 * uid + dev
                        await tx.execute(
                            "INSERT INTO devices (device_pk, device_id, user_id, name, kind, token_hash, pair_us)"
                            " VALUES (?, ?, ?, 'd', 1, ?, 0)",
                            (pk, f"dev{pk}", uid, bytes([pk])),
                        )
                for seq, (uid, dev, off_s, count, is_steps) in enumerate(events, start=1):
                    t = T0 + off_s * 1_000_000
                    ev = steps_event(t, count) if is_steps else app_event(t, "x")
                    await tx.execute(
                        "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (2 * uid + dev, seq, uid, t, kind_of(ev), t, ev.SerializeToString()),
                    )
            start = T0 + start_off * 1_000_000
            got = await steps_in_window(TimelineStore(SqliteTimelineStorage(db)), 1, start, WINDOW)
        finally:
            await db.close()
    # Independently: a count reported at t is the minute ending at or after t; per minute, each
    # device's total, and the minute counts its larger device; the window holds the minutes
    # that start in it (rounded down to whole minutes).
    by_minute: dict[int, list[int]] = {}
    for uid, dev, off, c, s in events:
        t = T0 + off * 1_000_000
        minute = -(-t // MIN) - 1
        if uid == 1 and s and start // MIN <= minute < (start + WINDOW) // MIN:
            by_minute.setdefault(minute, [0, 0])[dev] += c
    assert got == sum(max(pair) for pair in by_minute.values())
    return got


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([1, 2]),
            st.sampled_from([0, 1]),
            st.integers(0, 7200),
            st.integers(0, 300),
            st.booleans(),
        ),
        max_size=60,
    ),
    st.integers(0, 5400),
)
def test_steps_outcome_is_exact(events, start_off) -> None:
    asyncio.run(_check(events, start_off))


def test_a_walk_counted_by_two_devices_counts_once() -> None:
    same = [(1, 0, 60 * m, 100, True) for m in range(1, 11)] + [
        (1, 1, 60 * m, 90, True) for m in range(1, 11)
    ]
    assert asyncio.run(_check(same, 0)) == 1000  # the phone's 100/min, not 1900
    apart = [(1, 0, 60 * m, 100, True) for m in range(1, 6)] + [
        (1, 1, 60 * m, 100, True) for m in range(6, 11)
    ]
    assert asyncio.run(_check(apart, 0)) == 1000  # different minutes: both count

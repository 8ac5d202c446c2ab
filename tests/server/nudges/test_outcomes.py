"""The steps-in-30-minutes outcome computed from the stored timeline is exact."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from pulsesync.kinds import kind_of
from pulsesync.server.nudges.engine import steps_in_window
from pulsesync.server.storage.db import Database
from pulsesync.server.timeline.store import TimelineStore
from tests.server.nudges.support import app_event, steps_event

MIN = 60_000_000
T0 = 1_767_225_600_000_000
WINDOW = 30 * MIN


async def _check(events: list[tuple[int, int, int, bool]], start_off: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = await Database.open(Path(tmp) / "t.db")
        try:
            async with db.transaction() as tx:
                for uid in (1, 2):
                    await tx.execute(
                        "INSERT INTO users (user_id, name, create_us) VALUES (?, ?, 0)",
                        (uid, f"u{uid}"),
                    )
                    await tx.execute(
                        "INSERT INTO devices (device_pk, device_id, user_id, name, kind, token_hash, pair_us)"
                        " VALUES (?, ?, ?, 'd', 1, ?, 0)",
                        (uid, f"dev{uid}", uid, bytes([uid])),
                    )
                for seq, (uid, off_s, count, is_steps) in enumerate(events, start=1):
                    t = T0 + off_s * 1_000_000
                    ev = steps_event(t, count) if is_steps else app_event(t, "x")
                    await tx.execute(
                        "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (uid, seq, uid, t, kind_of(ev), t, ev.SerializeToString()),
                    )
            start = T0 + start_off * 1_000_000
            got = await steps_in_window(TimelineStore(db), 1, start, WINDOW)
            want = sum(
                c
                for uid, off, c, s in events
                if uid == 1 and s and start <= T0 + off * 1_000_000 < start + WINDOW
            )
            assert got == want
        finally:
            await db.close()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([1, 2]), st.integers(0, 7200), st.integers(0, 300), st.booleans()
        ),
        max_size=60,
    ),
    st.integers(0, 5400),
)
def test_steps_outcome_is_exact(events, start_off) -> None:
    asyncio.run(_check(events, start_off))

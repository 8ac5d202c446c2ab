"""Nudge outcomes: expiry of undelivered nudges, and the steps each decision was followed by.

A decision's outcome is the steps in the window after it (`outcome_window_us`), computed once
the window and a grace for late uploads have passed, from the timeline (the same events every
reader sees), and folded back into the person's features for the next decisions.
"""

from __future__ import annotations

import json

from pulsesync.server.nudges.catalog import Catalog
from pulsesync.server.nudges.features import FeatureStore, hour_bucket
from pulsesync.server.storage.nudges import NudgeStorage
from pulsesync.server.timeline.steps import steps_in_window
from pulsesync.server.timeline.store import TimelineStore
from pulsesync.v1 import events_pb2


class Outcomes:
    """Expires nudges and completes the outcomes of past decisions."""

    def __init__(
        self,
        storage: NudgeStorage,
        timeline: TimelineStore,
        catalog: Catalog,
        features: FeatureStore,
    ) -> None:
        self._storage = storage
        self._timeline = timeline
        self._catalog = catalog
        self._features = features

    async def expire(self, now: int) -> int:
        """Mark undelivered nudges past their expiry; how many."""
        return await self._storage.expire(now)

    async def steps_after(self, user_id: int, start_us: int) -> int:
        """Steps in [start, start + window) by the steps rule (timeline/steps.py): the outcome."""
        return await steps_in_window(
            self._timeline, user_id, start_us, self._catalog.policy.outcome_window_us
        )

    async def complete(self, now: int) -> int:
        """Compute outcomes of decisions whose window and grace have passed; how many."""
        p = self._catalog.policy
        rows = await self._storage.open_decisions(now - p.outcome_window_us - p.outcome_grace_us)
        if not rows:
            return 0
        done: list[tuple[int, float]] = []
        nudge_updates: list[tuple[str, float | None]] = []
        for d in rows:
            steps = float(await self.steps_after(d.user_id, d.decision_us))
            done.append((d.decision_id, steps))
            acted: float | None = None
            if d.nudge_id:
                metric = (
                    self._catalog.type(d.chosen).outcome
                    if d.chosen in self._catalog.actions
                    else "steps_30m"
                )
                acted = (
                    1.0
                    if await self._storage.acted(d.nudge_id, events_pb2.NUDGE_ACTION_ACTED)
                    else 0.0
                )
                nudge_updates.append((d.nudge_id, steps if metric == "steps_30m" else acted))
            if d.user_id in self._features.known_users():
                minute = int(json.loads(d.features_json).get("local_minute", 0))
                state = self._features.user(d.user_id)
                state.record_outcome(d.chosen, hour_bucket(minute), steps)
                if acted is not None:
                    state.record_response(d.chosen, acted > 0)
        await self._storage.complete_outcomes(done, nudge_updates)
        return len(done)

"""Keeping the learned policy at its daily budget on its own decision points.

Training sets the model's send threshold on the last week of the log (model.budget_threshold),
but those decision points are the *previous* policy's: under the randomized cold start a send
often blocks the next hour (global cooldown), the next two of its type and the sedentary
trigger, while the learned policy, sending less, meets other points; and predicted gains
drift with habituation. In the simulator a threshold set that way sent 0.6 nudges per
person-day on a budget of 1.

So the server re-sets the threshold from the promoted model's own recent decisions: it
remembers, for the last `BUDGET_DAYS` days, every decision point it took (for the person-days)
and the best predicted gain and option count of each one with a choice, and recomputes the
threshold at which the policy would have sent `daily_budget` nudges per person-day there
(the same function training uses). It is causal (only past decision points), its decisions
log the probabilities they were drawn with, and it reads no storage. A promoted model starts
from its training threshold until one day of its own decisions is seen; a new model starts
afresh (its gains are on its own scale). State is per server process (a restart starts
again from the training threshold; with several replicas each paces the people it decides
for).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Hashable
from typing import Final

import numpy as np

from pulsesync.server.nudges.model import BUDGET_DAYS, budget_threshold
from pulsesync.timeutil import US_PER_DAY

# How often (clock time) the threshold is recomputed, and how much of a model's own decisions
# it needs first.
REFRESH_US: Final = 3600 * 1_000_000
MIN_SPAN_US: Final = US_PER_DAY


class BudgetPacer:
    """The send threshold that keeps a model's policy at daily_budget nudges per person-day."""

    def __init__(
        self,
        daily_budget: float | None,
        min_gain: float,
        floor: float,
        window_us: int = int(BUDGET_DAYS * US_PER_DAY),
    ) -> None:
        self.daily_budget = daily_budget
        self.min_gain = min_gain
        self.floor = floor
        self.window_us = window_us
        self._version: str | None = None
        self._since = 0
        self._threshold: float | None = None
        self._computed_us = 0
        self._points: deque[tuple[int, float, float]] = deque()  # (at, best gain, options)
        self._days: deque[tuple[int, Hashable]] = deque()  # (at, (person, local day))
        self._day_count: Counter[Hashable] = Counter()

    def _start(self, version: str, now_us: int) -> None:
        self._version = version
        self._since = now_us
        self._threshold = None
        self._points.clear()
        self._days.clear()
        self._day_count.clear()

    def threshold(self, version: str, trained: float, now_us: int) -> float:
        """The threshold for this model now: its paced one once it has a day of its own
        decisions, else its training threshold."""
        if version != self._version:
            self._start(version, now_us)
        if self.daily_budget is None or self._threshold is None:
            return trained
        return self._threshold

    def record(
        self, version: str, person_day: Hashable, now_us: int, best: float | None, options: int
    ) -> None:
        """One decision point of the model's policy (best: its best predicted gain, None when
        only sending nothing was eligible)."""
        if self.daily_budget is None:
            return
        if version != self._version:
            self._start(version, now_us)
        self._days.append((now_us, person_day))
        self._day_count[person_day] += 1
        if best is not None and options > 1:
            self._points.append((now_us, best, float(options)))

    def refresh(self, now_us: int) -> float | None:
        """Recompute the threshold (at most every REFRESH_US); the current paced one."""
        if self.daily_budget is None or self._version is None:
            return None
        if now_us - self._since < MIN_SPAN_US:
            return self._threshold
        if self._threshold is not None and now_us - self._computed_us < REFRESH_US:
            return self._threshold
        cutoff = now_us - self.window_us
        while self._points and self._points[0][0] < cutoff:
            self._points.popleft()
        while self._days and self._days[0][0] < cutoff:
            _, key = self._days.popleft()
            self._day_count[key] -= 1
            if self._day_count[key] <= 0:
                del self._day_count[key]
        self._computed_us = now_us
        if not self._day_count:
            return self._threshold
        best = np.array([p[1] for p in self._points], dtype=np.float64)
        options = np.array([p[2] for p in self._points], dtype=np.float64)
        self._threshold = budget_threshold(
            best, options, len(self._day_count), self.daily_budget, self.min_gain, self.floor
        )
        return self._threshold

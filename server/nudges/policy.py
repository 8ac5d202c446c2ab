"""Choosing among the eligible options with exploration, and logging the exact probabilities.

Cold start (no promoted model): HeartSteps' micro-randomized policy. With probability
`cold_start_send_probability` (0.6; or its band in `cold_start_by_local_time` at the
decision's local time) a nudge is sent, its type drawn uniformly from the eligible types;
otherwise nothing. Learned: the option with the highest predicted outcome,
where a nudge must beat sending nothing by the model's threshold (at least `min_gain_steps`;
see model.py: set on the last week of decisions so the policy sends at most `daily_budget`
nudges per person-day), gets the greedy mass; every eligible option keeps `exploration_floor`. The probabilities always sum to one over exactly
the eligible options, and the one of the option chosen is what is logged.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pulsesync.server.nudges.catalog import NONE_ACTION, PolicySettings

COLD_START = "randomized"


@dataclass(frozen=True, slots=True)
class Choice:
    """The distribution over eligible options and the option drawn from it."""

    probabilities: dict[str, float]
    chosen: str

    @property
    def probability(self) -> float:
        return self.probabilities[self.chosen]


def randomized(options: Sequence[str], send_probability: float) -> dict[str, float]:
    """HeartSteps-style: send with send_probability, type uniform among the eligible ones."""
    types = [o for o in options if o != NONE_ACTION]
    if not types:
        return {NONE_ACTION: 1.0}
    each = send_probability / len(types)
    probs = {o: each for o in types}
    probs[NONE_ACTION] = 1.0 - send_probability
    return {o: probs[o] for o in options}


def greedy_with_floor(
    options: Sequence[str], predicted: Mapping[str, float], min_gain: float, floor: float
) -> dict[str, float]:
    """All the non-floor mass on the best option (nudges pay min_gain); floor on each."""
    k = len(options)
    floor = min(floor, 1.0 / k)

    def utility(o: str) -> float:
        return predicted[o] - (0.0 if o == NONE_ACTION else min_gain)

    best = max(options, key=lambda o: (utility(o), o == NONE_ACTION))
    probs = {o: floor for o in options}
    probs[best] += 1.0 - floor * k
    return probs


def draw(probabilities: Mapping[str, float], rng: random.Random) -> str:
    """One option drawn from probabilities (in their order)."""
    u = rng.random()
    acc = 0.0
    last = ""
    for option, p in probabilities.items():
        acc += p
        last = option
        if u < acc:
            return option
    return last


def choose(
    options: Sequence[str],
    predicted: Mapping[str, float] | None,
    settings: PolicySettings,
    rng: random.Random,
    min_gain: float | None = None,
    local_minute: float | None = None,
) -> Choice:
    """The policy: randomized without a model, greedy with an exploration floor with one."""
    if predicted is None:
        probs = randomized(options, settings.cold_start_probability(local_minute))
    else:
        gain = settings.min_gain_steps if min_gain is None else min_gain
        probs = greedy_with_floor(options, predicted, gain, settings.exploration_floor)
    return Choice(probs, draw(probs, rng))

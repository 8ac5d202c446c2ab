"""The behaviour model run at decision points without a server: for calibration and schedules.

Driving a real server costs minutes per simulated month; the trial check and the search over
fixed schedules need many months. This module applies behavior.py's people, days, response
and burden directly at decision points (the same functions the server-driven runner uses), so
its figures are the simulator's own, without the server's eligibility rules in between:

* `trial_points`: HeartSteps V1's design. At each of the five daily decision points at which
  the person is available (not already walking), a walking suggestion with probability 0.3,
  an anti-sedentary one with 0.3, nothing with 0.4; the outcome is the steps in the 30
  minutes after.
* `schedule_gain`: the expected steps a fixed schedule adds per person-day (each nudge's exact
  response probability times the mean act), for ranking schedules.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal

from pulsesync.server.nudges.catalog import load_catalog
from pulsesync.server.nudges.sim.behavior import (
    BASE_RESPONSE,
    MAX_RESPONSE,
    Day,
    Person,
    burden_dose,
    day_plan,
    expected_walk_steps,
    people,
    response_probability,
    response_walk,
    time_of_day,
)
from pulsesync.server.nudges.sim.behavior import burden as burden_multiplier
from pulsesync.server.nudges.sim.trial import BREAK, WALK, Point
from pulsesync.timeutil import US_PER_MIN

# The catalog's five daily decision points (08:30, 12:15, 15:30, 18:00, 20:30) as the runner
# takes them: at the end of the 30-minute block that holds each.
SLOTS: Final = (510, 750, 930, 1080, 1230)
TRIAL_SEND: Final = {WALK: 0.3, BREAK: 0.3}  # the rest: nothing
WINDOW_MIN: Final = 30
# The shipped catalog's cooldowns: after any nudge, and between two of one type.
_CATALOG: Final = load_catalog()
GLOBAL_COOLDOWN_MIN: Final = _CATALOG.policy.global_cooldown_us // US_PER_MIN
TYPE_COOLDOWN_MIN: Final = {
    t.name: t.cooldown_us // US_PER_MIN for t in _CATALOG.types if t.name in (WALK, BREAK)
}


def walking_now(d: Day, minute: int) -> bool:
    """Already walking (HeartSteps: not available for a suggestion)."""
    return minute > 0 and float(d.steps[max(0, minute - 10) : minute].mean()) > 60


def sedentary_for(d: Day, minute: int) -> int:
    """Minutes (up to 120) since the last minute with 20 steps or more."""
    for k in range(1, 121):
        if minute - k < 0 or d.steps[minute - k] >= 20:
            return k - 1
    return 120


@dataclass(slots=True)
class _Burden:
    """A person's dose of recent nudges (behavior.burden_dose), by absolute minute."""

    last: tuple[float, int] | None = None

    def now(self, minute: int) -> float:
        return burden_dose(self.last, minute)[0]

    def add(self, minute: int) -> None:
        self.last = (burden_dose(self.last, minute)[1], minute)


def trial_points(
    n_people: int,
    days: int,
    seed: int,
    base_response: Mapping[str, float] = BASE_RESPONSE,
) -> list[Point]:
    """The trial-design randomized arm's available decision points (person, slot, week, sent, steps)."""
    out = []
    for p in people(n_people, seed):
        burden = _Burden()
        for day in range(days):
            d = day_plan(p, day, seed)
            rng = random.Random(f"trial-{seed}-{p.index}-{day}")
            for slot, m in enumerate(SLOTS, 1):
                if walking_now(d, m):
                    continue
                u = rng.random()
                # Its own stream per decision point: the same draws whatever the response rates.
                act = random.Random(f"act-{seed}-{p.index}-{day}-{m}")
                chosen = WALK if u < TRIAL_SEND[WALK] else BREAK if u < 0.6 else "none"
                y = float(d.steps[m : m + WINDOW_MIN].sum())
                if chosen != "none":
                    t = day * 1440 + m
                    prob = response_probability(p, chosen, d, m, burden.now(t), True, base_response)
                    if act.random() < prob:
                        delay, dur, spm = response_walk(chosen, act)
                        y += spm * max(0, min(dur, WINDOW_MIN - delay))
                    burden.add(t)
                out.append(Point(p.index, slot, day // 7 + 1, chosen, y))
    return out


def _eligible(d: Day, minute: int, last: Mapping[str, int], t: int) -> list[str]:
    """The activity types the catalog would allow (cooldowns, already walking, sitting)."""
    if any(t - at < GLOBAL_COOLDOWN_MIN for at in last.values()):
        return []
    out = []
    if not walking_now(d, minute) and t - last.get(WALK, -(10**9)) >= TYPE_COOLDOWN_MIN[WALK]:
        out.append(WALK)
    if sedentary_for(d, minute) >= 45 and t - last.get(BREAK, -(10**9)) >= TYPE_COOLDOWN_MIN[BREAK]:
        out.append(BREAK)
    return out


def _deliver(
    p: Person, d: Day, kind: str, m: int, t: int, burden: _Burden, last: dict[str, int]
) -> float:
    """Deliver a nudge at local minute m (absolute minute t): its expected steps added."""
    prob = response_probability(p, kind, d, m, burden.now(t), True)
    burden.add(t)
    last[kind] = t
    return prob * expected_walk_steps(kind)


def schedule_gain(
    persons: Sequence[Person],
    plans: Sequence[Sequence[Day]],
    minutes: Sequence[int],
    first_day: int = 0,
) -> tuple[float, float]:
    """(expected steps added, nudges) per person-day from first_day on, for a fixed schedule.

    A nudge at each scheduled minute of an eligible type (drawn uniformly, as the server's
    fixed arm does), on the device in use.
    """
    gained, sent, person_days = 0.0, 0, 0
    for p, days in zip(persons, plans, strict=True):
        burden = _Burden()
        last: dict[str, int] = {}
        for day, d in enumerate(days):
            rng = random.Random(f"fixed-{p.index}-{day}")
            counted = day >= first_day
            person_days += counted
            for m in sorted(minutes):
                t = day * 1440 + m
                types = _eligible(d, m, last, t)
                if not types:
                    continue
                added = _deliver(p, d, rng.choice(types), m, t, burden, last)
                if counted:
                    gained += added
                    sent += 1
    return gained / max(1, person_days), sent / max(1, person_days)


# What the policy in `ceiling` knows of the truth it ranks decision points by.
Knows = Literal["all", "person", "moment"]


def known_probability(
    knows: Knows, p: Person, kind: str, d: Day, minute: int, dose: float
) -> float:
    """The response probability as a policy knowing only part of the truth would rank it.

    "all": the simulator's truth. "person": the person's responsiveness, their dose, the type
    and the time of day, not the moment (busy, sitting, already walking). "moment": all of the
    moment, the dose, the type and the time of day, not the person's responsiveness.
    """
    if knows == "all":
        return response_probability(p, kind, d, minute, dose, True)
    if knows == "moment":
        return response_probability(replace(p, responsiveness=1.0), kind, d, minute, dose, True)
    if knows == "person":
        mult = p.responsiveness * burden_multiplier(dose) * time_of_day(minute)
        return min(MAX_RESPONSE, BASE_RESPONSE.get(kind, 0.0) * mult)
    raise ValueError(f"knows must be 'all', 'person' or 'moment', not {knows!r}")


def ceiling(
    persons: Sequence[Person],
    plans: Sequence[Sequence[Day]],
    minutes: Sequence[int],
    cold_start: Callable[[int], float],
    first_day: int,
    per_day: int,
    daily_cap: int | None = None,
    knows: Knows = "all",
) -> tuple[float, float]:
    """(expected steps added, nudges) per person-day over all days: a cold start, then a policy
    that knows the simulator's truth (knows "all"; or part of it, `known_probability`: the
    gains are always the truth's).

    Before first_day, the randomized cold start at each of minutes (send with
    cold_start(minute), a type drawn uniformly; at most daily_cap a day when given, as the
    catalog's policy.daily_cap stops it). From first_day, each day the per_day decision
    points (an hour apart, two of one type as far apart as its cooldown) with the highest
    expected gain given the dose that morning, the best type at each: an upper bound on what
    a model choosing among these decision points after that cold start can add (greedy day
    by day, so not the exact optimum over the burden's weeks).
    """
    gained, sent = 0.0, 0
    for p, days in zip(persons, plans, strict=True):
        burden = _Burden()
        last: dict[str, int] = {}
        for day, d in enumerate(days):
            if day < first_day:
                rng = random.Random(f"cold-{p.index}-{day}")
                today = 0
                for m in sorted(minutes):
                    if daily_cap is not None and today >= daily_cap:
                        break
                    t = day * 1440 + m
                    types = _eligible(d, m, last, t)
                    if types and rng.random() < cold_start(m):
                        gained += _deliver(p, d, rng.choice(types), m, t, burden, last)
                        sent += 1
                        today += 1
                continue
            ranked = sorted(
                (
                    known_probability(knows, p, k, d, m, burden.now(day * 1440 + m))
                    * expected_walk_steps(k),
                    m,
                    k,
                )
                for m in minutes
                for k in _eligible(d, m, last, day * 1440 + m)
            )
            chosen: list[tuple[int, str]] = []
            for _, m, k in reversed(ranked):
                if len(chosen) < per_day and all(
                    abs(m - c) >= (TYPE_COOLDOWN_MIN[k] if k == ck else GLOBAL_COOLDOWN_MIN)
                    for c, ck in chosen
                ):
                    chosen.append((m, k))
            for m, k in sorted(chosen):
                gained += _deliver(p, d, k, m, day * 1440 + m, burden, last)
                sent += 1
    person_days = max(1, sum(len(days) for days in plans))
    return gained / person_days, sent / person_days


def best_schedule(
    persons: Sequence[Person],
    days: int,
    seed: int,
    first_day: int = 0,
    grid: Sequence[int] = tuple(range(450, 1290, 30)),
    per_day: int = 3,
    shortlist: int = 12,
) -> tuple[tuple[int, ...], float, list[tuple[tuple[int, ...], float]]]:
    """The fixed per_day-a-day schedule (block-end minutes on grid) that adds the most steps.

    Every combination (times at least an hour apart, the global cooldown) is ranked by the sum
    of its times' gains as a one-a-day schedule, then the shortlist is simulated as whole
    schedules (their burden and cooldowns included) and the best of those is taken.
    Returns the best schedule, its gain per person-day, and the shortlist's exact gains.
    """
    plans = [[day_plan(p, day, seed) for day in range(days)] for p in persons]
    single = {}
    for m in grid:
        single[m] = schedule_gain(persons, plans, [m], first_day)[0]
    combos = [
        c
        for c in itertools.combinations(grid, per_day)
        if all(b - a >= 60 for a, b in itertools.pairwise(c))
    ]
    combos.sort(key=lambda c: -sum(single[m] for m in c))
    exact = [(c, schedule_gain(persons, plans, c, first_day)[0]) for c in combos[:shortlist]]
    exact.sort(key=lambda x: -x[1])
    return exact[0][0], exact[0][1], exact

"""Simulated people: daily routines across phone, desktop and wearable, and how they respond.

Baseline behaviour (steps, device use, busy periods) is drawn per (seed, user, day) and never
depends on nudges, so every policy sees the same days (common random numbers) and the
difference between two arms is exactly what the nudges caused. A response to a nudge is a
few minutes on one's feet; its probability depends on the person, the context and the
burden of recent nudges (see docs/nudges.md for every number and where it comes from).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Final

import numpy as np
import numpy.typing as npt

MIN_PER_DAY: Final = 1440
WALK_SPM: Final = 100  # steps per minute of brisk walking
# Response probabilities at multiplier 1 (person, context, burden): calibrated on the
# trial-design randomized arm only (sim/calibrate.py, sim/trial.py; docs/nudges.md has every
# figure), never against a learned policy.
BASE_RESPONSE: Final = {"walking_suggestion": 1.1, "break_from_sitting": 0.75}
# Burden ("dosage", as in HeartSteps V2's design): every delivered nudge adds 1 to the person's
# dose, which fades with DOSE_DAYS; the response is scaled by exp(-dose / DOSE_SCALE). Under
# p=0.6 randomization (~3 nudges a day) that gives the trial's week pattern: a large effect in
# week 1, a third of it in week 2, next to nothing after. The trial cannot tell fading with
# time from fading with nudges received; this model takes the latter, so a person sent fewer
# nudges keeps more of the effect.
DOSE_DAYS: Final = 14.0
DOSE_SCALE: Final = 10.0
BUSY_MULT: Final = 0.1  # in a meeting or commuting: the suggestion is seen but cannot be acted on
SEDENTARY_MULT: Final = 1.6  # sitting for an hour or more
WALKING_MULT: Final = 0.2  # already walking: little to add
WRONG_DEVICE_MULT: Final = 0.4  # shown on a device the person is not using
DESK_MOVING: Final = 0.3  # share of desk minutes with a few steps recorded
MAX_RESPONSE: Final = 0.95  # nobody answers every nudge
# Time of day (local minute ranges -> multiplier): the trial's effect is concentrated at lunch
# and in the mid-afternoon (slots 2 and 3), small in the early evening and absent in the
# morning and late evening.
TIME_OF_DAY: Final = (
    (0, 600, 0.15),
    (600, 690, 0.6),
    (690, 870, 1.5),
    (870, 1020, 2.0),
    (1020, 1170, 0.9),
    (1170, MIN_PER_DAY, 0.15),
)


@dataclass(frozen=True, slots=True)
class Person:
    """One simulated person's traits."""

    index: int
    worker: bool
    wake_min: int
    sleep_min: int
    responsiveness: float
    lunch_walker: float
    evening_walker: float
    has_desktop: bool


@dataclass(slots=True)
class Day:
    """One day of baseline behaviour at minute resolution (local time = UTC here)."""

    steps: npt.NDArray[np.int64]
    busy: npt.NDArray[np.bool_]
    device: npt.NDArray[np.int8]  # 0 none, 1 phone, 2 desktop
    app: list[str] = field(default_factory=list)


def people(n: int, seed: int) -> list[Person]:
    """n people with heterogeneous routines and responsiveness."""
    rng = random.Random(f"people-{seed}")
    out = []
    for i in range(n):
        worker = rng.random() < 0.75
        out.append(
            Person(
                index=i,
                worker=worker,
                wake_min=int(rng.gauss(420, 30)),
                sleep_min=int(rng.gauss(1350, 30)),
                responsiveness=math.exp(rng.gauss(-0.18, 0.6)),  # lognormal, mean 1
                lunch_walker=rng.uniform(0.1, 0.6),
                evening_walker=rng.uniform(0.1, 0.5),
                has_desktop=worker or rng.random() < 0.5,
            )
        )
    # The cohort's mean responsiveness is exactly 1: the seed and the size of the cohort change
    # who responds, not how much the cohort responds on average (without this, the cohort mean
    # of 24 lognormal draws alone moves the HeartSteps figures by ~15%).
    mean = sum(p.responsiveness for p in out) / max(1, len(out))
    return [replace(p, responsiveness=p.responsiveness / mean) for p in out]


def _walk(
    steps: npt.NDArray[np.int64], rng: random.Random, start: int, minutes: int, spm: float
) -> None:
    for m in range(max(0, start), min(MIN_PER_DAY, start + minutes)):
        steps[m] += int(rng.gauss(spm, spm * 0.1))


def day_plan(p: Person, day: int, seed: int) -> Day:
    """The person's baseline day (same for every policy)."""
    rng = random.Random(f"day-{seed}-{p.index}-{day}")
    steps = np.zeros(MIN_PER_DAY, dtype=np.int64)
    busy = np.zeros(MIN_PER_DAY, dtype=np.bool_)
    device = np.zeros(MIN_PER_DAY, dtype=np.int8)
    weekday = day % 7 < 5
    wake, sleep = (
        p.wake_min + rng.randint(-20, 20),
        min(MIN_PER_DAY - 1, p.sleep_min + rng.randint(-30, 30)),
    )
    for m in range(wake, sleep):  # pottering about: a few steps in some minutes
        if rng.random() < 0.35:
            steps[m] += rng.randint(3, 30)
    if p.worker and weekday:
        for start in (480 + rng.randint(-15, 15), 1050 + rng.randint(-15, 30)):  # commutes
            busy[start : start + 30] = True
            if rng.random() < 0.7:
                _walk(steps, rng, start + 5, rng.randint(8, 15), WALK_SPM * 0.9)
        desk = range(540, 1020)
        for m in desk:
            # A wrist tracker at a keyboard records nothing in most minutes: many 30-minute
            # windows at a desk hold only a few dozen steps (on the log scale the trial's
            # effect comes largely from such windows).
            steps[m] = min(steps[m], 8) if rng.random() < DESK_MOVING else 0
            device[m] = 2
        for _ in range(rng.randint(1, 4)):  # meetings
            s = rng.randrange(540, 990, 15)
            busy[s : s + rng.choice((30, 45, 60))] = True
        if rng.random() < p.lunch_walker:
            _walk(steps, rng, 720 + rng.randint(0, 30), rng.randint(10, 25), WALK_SPM)
    else:
        for _ in range(rng.randint(1, 3)):
            _walk(
                steps,
                rng,
                rng.randint(wake + 60, sleep - 120),
                rng.randint(10, 40),
                WALK_SPM * 0.95,
            )
    if rng.random() < p.evening_walker:
        _walk(steps, rng, rng.randint(1110, 1230), rng.randint(15, 35), WALK_SPM)
    for block in range(wake // 10, sleep // 10):  # phone use outside desk time
        if device[block * 10] == 0 and rng.random() < 0.4:
            device[block * 10 : block * 10 + 10] = 1
    if not p.has_desktop:
        device[device == 2] = 1
    apps = [
        "calendar" if busy[m] else ("editor" if device[m] == 2 else "social")
        for m in range(MIN_PER_DAY)
    ]
    return Day(steps, busy, device, apps)


def burden(dose: float) -> float:
    """Effect multiplier for a dose of recent nudges (see DOSE_DAYS)."""
    return math.exp(-dose / DOSE_SCALE)


def burden_dose(last: tuple[float, int] | None, minute: int) -> tuple[float, float]:
    """(dose before, dose after) a nudge delivered at an absolute minute, given the dose just
    after the previous one and its minute (None: the first nudge)."""
    if last is None:
        return 0.0, 1.0
    before = last[0] * math.exp(-(minute - last[1]) / 1440 / DOSE_DAYS)
    return before, before + 1.0


def time_of_day(minute: int) -> float:
    """The time-of-day multiplier at a local minute."""
    for lo, hi, mult in TIME_OF_DAY:
        if lo <= minute < hi:
            return mult
    return 0.0


def context_multiplier(
    p: Person, nudge_type: str, d: Day, minute: int, dose: float, on_active_device: bool
) -> float:
    """What the person, the context and the burden do to the base response probability."""
    m = min(max(minute, 0), MIN_PER_DAY - 1)
    lo = max(0, m - 60)
    sedentary = bool(d.steps[lo:m].max(initial=0) < 20) and m - lo >= 60
    walking = d.steps[max(0, m - 10) : m].mean() > 60 if m > 0 else False
    mult = p.responsiveness * burden(dose) * time_of_day(m)
    if d.busy[m]:
        mult *= BUSY_MULT
    if sedentary:
        mult *= SEDENTARY_MULT
    elif nudge_type == "break_from_sitting":
        mult *= 0.5
    if walking:
        mult *= WALKING_MULT
    if not on_active_device:
        mult *= WRONG_DEVICE_MULT
    return float(mult)


def response_probability(
    p: Person,
    nudge_type: str,
    d: Day,
    minute: int,
    dose: float,
    on_active_device: bool,
    base_response: Mapping[str, float] = BASE_RESPONSE,
) -> float:
    """The chance the person acts on this nudge (the simulator's truth); dose before it."""
    base = base_response.get(nudge_type, 0.0)
    if base == 0.0:
        return 0.0
    return min(
        MAX_RESPONSE,
        base * context_multiplier(p, nudge_type, d, minute, dose, on_active_device),
    )


# Acting on a suggestion is a few minutes on one's feet, not a long walk: the trial's effect is
# +14.5% on the log scale but only +5% in mean steps, which many short bouts give and rare long
# walks cannot.
WALK_MINUTES: Final = {"walking_suggestion": (1, 4), "break_from_sitting": (1, 3)}
WALK_PACE: Final = {"walking_suggestion": 1.0, "break_from_sitting": 0.8}


def expected_walk_steps(nudge_type: str) -> float:
    """Mean steps an act adds (all of it falls inside the 30-minute window)."""
    lo, hi = WALK_MINUTES.get(nudge_type, (0, 0))
    return (lo + hi) / 2 * int(WALK_SPM * WALK_PACE.get(nudge_type, 1.0))


def response_walk(nudge_type: str, rng: random.Random) -> tuple[int, int, float]:
    """(delay min, duration min, steps per minute) of an act on a suggestion."""
    lo, hi = WALK_MINUTES.get(nudge_type, (0, 0))
    return (
        rng.randint(0, 8),
        rng.randint(lo, hi),
        float(int(WALK_SPM * WALK_PACE.get(nudge_type, 1.0))),
    )

"""Simulated people: daily routines across phone, desktop and wearable, and how they respond.

Baseline behaviour (steps, device use, busy periods) is drawn per (seed, user, day) and never
depends on nudges, so every policy sees the same days (common random numbers) and the
difference between two arms is exactly what the nudges caused. A response to a nudge is a
short walk; its probability depends on the person, the context and habituation (see
docs/nudges.md for every number and where it comes from).
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
# Response probabilities at multiplier 1 (person, context, habituation): calibrated on the
# p=0.6 randomized arm only (sim/calibrate.py; docs/nudges.md has the procedure and figures),
# never against a learned policy. Break-from-sitting: 0, HeartSteps' anti-sedentary finding.
BASE_RESPONSE: Final = {"walking_suggestion": 0.0397, "break_from_sitting": 0.0}
# Habituation: 2x in the first days, fading with this time constant (days) so that the mean
# over four weeks is ~1x (HeartSteps: about twice the average effect early, gone by ~4 weeks).
HABITUATION_DAYS: Final = 18.0
BUSY_MULT: Final = 0.1  # in a meeting or commuting: the suggestion is seen but cannot be acted on
SEDENTARY_MULT: Final = 1.6  # sitting for an hour or more
WALKING_MULT: Final = 0.2  # already walking: little to add
GOOD_HOUR_MULT: Final = 1.4  # lunch and early evening
EARLY_MULT: Final = 0.6  # before 09:00
WRONG_DEVICE_MULT: Final = 0.4  # shown on a device the person is not using
MAX_RESPONSE: Final = 0.95  # nobody answers every nudge


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
            steps[m] = min(steps[m], 8)
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


def habituation(days_since_first: float) -> float:
    """Effect multiplier by days since the first nudge."""
    return 2.0 * math.exp(-days_since_first / HABITUATION_DAYS)


def context_multiplier(
    p: Person, nudge_type: str, d: Day, minute: int, days_since_first: float, on_active_device: bool
) -> float:
    """What the person, the context and habituation do to the base response probability."""
    m = min(max(minute, 0), MIN_PER_DAY - 1)
    lo = max(0, m - 60)
    sedentary = bool(d.steps[lo:m].max(initial=0) < 20) and m - lo >= 60
    walking = d.steps[max(0, m - 10) : m].mean() > 60 if m > 0 else False
    mult = p.responsiveness * habituation(days_since_first)
    if d.busy[m]:
        mult *= BUSY_MULT
    if sedentary:
        mult *= SEDENTARY_MULT
    elif nudge_type == "break_from_sitting":
        mult *= 0.5
    if walking:
        mult *= WALKING_MULT
    if 720 <= m < 840 or 1020 <= m < 1200:
        mult *= GOOD_HOUR_MULT
    elif m < 540:
        mult *= EARLY_MULT
    if not on_active_device:
        mult *= WRONG_DEVICE_MULT
    return float(mult)


def response_probability(
    p: Person,
    nudge_type: str,
    d: Day,
    minute: int,
    days_since_first: float,
    on_active_device: bool,
    base_response: Mapping[str, float] = BASE_RESPONSE,
) -> float:
    """The chance the person goes for a walk after this nudge (the simulator's truth)."""
    base = base_response.get(nudge_type, 0.0)
    if base == 0.0:
        return 0.0
    return min(
        MAX_RESPONSE,
        base * context_multiplier(p, nudge_type, d, minute, days_since_first, on_active_device),
    )


def expected_walk_steps(nudge_type: str) -> float:
    """Mean steps a responding walk adds (all of it falls inside the 30-minute window)."""
    if nudge_type == "break_from_sitting":
        return 7 * int(WALK_SPM * 0.8)  # 5-9 min
    return 11 * WALK_SPM  # 8-14 min


def response_walk(nudge_type: str, rng: random.Random) -> tuple[int, int, float]:
    """(delay min, duration min, steps per minute) of a responding walk."""
    if nudge_type == "break_from_sitting":
        return rng.randint(0, 5), rng.randint(5, 9), WALK_SPM * 0.8
    return rng.randint(0, 8), rng.randint(8, 14), float(WALK_SPM)

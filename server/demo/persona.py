"""A simulated person's day: what they do when, and how they answer nudges.

The plan is in local minutes after midnight. The phone and desktop apps record what the
person does through the Tracker SDK; the emulated wearable's heart and stride models follow
`activity_at`, so steps and heart rate match the day. A nudge the person acts on inserts a
short walk (or resumes the item) from that moment: the server then measures the outcome from
the timeline, as it would for a real person.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Final

from pulsesync.edge_agent.ble.physiology import Activity, Bout
from pulsesync.timeutil import US_PER_MIN, US_PER_S


class Doing:
    """What the person is doing in a segment of the day."""

    SLEEP: Final = "sleep"
    PHONE: Final = "phone"  # reading or studying on the phone, seated
    DESK: Final = "desk"  # working at the desktop
    WALK: Final = "walk"
    RUN: Final = "run"
    REST: Final = "rest"  # awake, no screen


@dataclass(frozen=True, slots=True)
class Segment:
    start_min: int
    end_min: int
    doing: str
    app: str = ""


# One ordinary weekday: desk work, a commute walk, a lunch walk, an evening run, studying on
# the phone, sleep. Minutes after local midnight.
WEEKDAY: Final[tuple[Segment, ...]] = (
    Segment(0, 390, Doing.SLEEP),
    Segment(390, 405, Doing.REST),
    Segment(405, 435, Doing.PHONE, "news"),
    Segment(435, 465, Doing.REST),
    Segment(465, 485, Doing.WALK),
    Segment(485, 720, Doing.DESK, "workbench"),
    Segment(720, 745, Doing.WALK),
    Segment(745, 1050, Doing.DESK, "workbench"),
    Segment(1050, 1080, Doing.REST),
    Segment(1080, 1110, Doing.RUN),
    Segment(1110, 1140, Doing.REST),
    Segment(1140, 1200, Doing.PHONE, "lingo"),
    Segment(1200, 1230, Doing.REST),
    Segment(1230, 1350, Doing.PHONE, "video"),
    Segment(1350, 1380, Doing.REST),
    Segment(1380, 1440, Doing.SLEEP),
)

# How long the person walks when they act on a walking suggestion.
NUDGE_WALK_MIN: Final = 10
# Chance of acting on a nudge, by what they are doing. At the desk a break is welcome; on
# the phone in the evening, less so (HeartSteps saw strong context dependence).
ACT_PROBABILITY: Final[dict[str, float]] = {
    Doing.DESK: 0.55,
    Doing.PHONE: 0.35,
    Doing.REST: 0.45,
    Doing.WALK: 0.1,
    Doing.RUN: 0.0,
    Doing.SLEEP: 0.0,
}


@dataclass(slots=True)
class Persona:
    """One person: the day plan from `day_start_us` (local midnight, UTC here) plus walks
    inserted by nudges they acted on."""

    name: str
    day_start_us: int
    seed: int = 7
    plan: tuple[Segment, ...] = WEEKDAY
    inserted_walks: list[tuple[int, int]] = field(default_factory=list)
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def segment_at(self, t_us: int) -> Segment:
        """The plan's segment at simulated time t_us (days repeat)."""
        minute = ((t_us - self.day_start_us) // US_PER_MIN) % 1440
        for seg in self.plan:
            if seg.start_min <= minute < seg.end_min:
                return seg
        return self.plan[-1]

    def doing_at(self, t_us: int) -> str:
        """What the person does at t_us, nudge-inserted walks included."""
        for start, end in self.inserted_walks:
            if start <= t_us < end:
                return Doing.WALK
        return self.segment_at(t_us).doing

    def activity_at(self, t_us: int) -> Bout:
        """The wearable's view: standing, walking or running, with cadence and speed."""
        doing = self.doing_at(t_us)
        jitter = self.rng.uniform(-4, 4)
        if doing == Doing.WALK:
            return Bout(Activity.WALKING, 60, 108 + jitter, 1.35)
        if doing == Doing.RUN:
            return Bout(Activity.RUNNING, 60, 166 + jitter, 3.1)
        return Bout(Activity.STANDING, 60, 0.0, 0.0)

    def answer(self, nudge_type: str, t_us: int) -> bool:
        """Whether the person acts on a nudge shown at t_us; acting on a movement nudge
        inserts a walk starting a minute later."""
        doing = self.doing_at(t_us)
        acts = self.rng.random() < ACT_PROBABILITY.get(doing, 0.0)
        if acts and nudge_type in MOVEMENT_NUDGES:
            start = t_us + US_PER_MIN
            self.inserted_walks.append((start, start + NUDGE_WALK_MIN * US_PER_MIN))
        return acts


MOVEMENT_NUDGES: Final = frozenset({"walking_suggestion", "break_from_sitting"})


class PersonaTrack:
    """The wearable emulation's activity track, following the persona (t in seconds since
    the sensor started at start_us)."""

    def __init__(self, persona: Persona, start_us: int) -> None:
        self._persona = persona
        self._start_us = start_us

    def at(self, t: float) -> Bout:
        return self._persona.activity_at(self._start_us + int(t * US_PER_S))

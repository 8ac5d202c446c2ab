"""Deterministic (seeded) physiological sequences for the emulated sensors: heart beats with
respiratory sinus arrhythmia and activity-driven heart rate, and walk/run/stand bouts."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Final

# Resting heart rate and how far exercise lifts it; typical adult values.
RESTING_BPM: Final = 62.0
WALKING_BPM: Final = 95.0
RUNNING_BPM: Final = 150.0
# Respiratory sinus arrhythmia: RR swings ~+-40 ms at rest at a ~4 s breathing period,
# shrinking with effort; beat-to-beat noise of ~12 ms gives resting RMSSD of 30-60 ms.
RSA_AMPLITUDE_MS: Final = 40.0
BREATHING_PERIOD_S: Final = 4.0
BEAT_NOISE_MS: Final = 12.0
# Heart rate follows effort with a time constant of ~20 s (on-kinetics of moderate exercise).
HR_TIME_CONSTANT_S: Final = 20.0


class Activity:
    """Activity states shared by the strap and the footpod of one emulated person."""

    STANDING: Final = "standing"
    WALKING: Final = "walking"
    RUNNING: Final = "running"


@dataclass(frozen=True, slots=True)
class Bout:
    """An activity held for a duration, with its cadence (steps/min) and speed (m/s)."""

    activity: str
    duration_s: float
    cadence_per_min: float
    speed_m_per_s: float


def bouts(seed: int) -> list[Bout]:
    """An endless-enough day of bouts: mostly walking, some running, pauses between."""
    rng = random.Random(seed)
    out: list[Bout] = []
    for _ in range(500):
        roll = rng.random()
        if roll < 0.25:
            out.append(Bout(Activity.STANDING, rng.uniform(10, 60), 0.0, 0.0))
        elif roll < 0.8:
            out.append(
                Bout(
                    Activity.WALKING,
                    rng.uniform(30, 180),
                    rng.uniform(100, 120),
                    rng.uniform(1.2, 1.6),
                )
            )
        else:
            out.append(
                Bout(
                    Activity.RUNNING,
                    rng.uniform(30, 240),
                    rng.uniform(155, 180),
                    rng.uniform(2.6, 3.8),
                )
            )
    return out


class ActivityTrack:
    """Which bout is current at a given emulated time."""

    def __init__(self, seed: int) -> None:
        self._bouts = bouts(seed)
        self._index = 0
        self._bout_start = 0.0

    def at(self, t: float) -> Bout:
        """The bout in progress at emulated time t (monotonic calls)."""
        while t - self._bout_start >= self._bouts[self._index].duration_s:
            self._bout_start += self._bouts[self._index].duration_s
            self._index = (self._index + 1) % len(self._bouts)
        return self._bouts[self._index]


class HeartModel:
    """Generates RR intervals (1/1024 s units) beat by beat."""

    def __init__(self, seed: int, track: ActivityTrack) -> None:
        self._rng = random.Random(seed)
        self._track = track
        self._t = 0.0
        self._bpm = RESTING_BPM + self._rng.uniform(-4, 4)
        self.energy_kj = 0.0

    def beats_until(self, t_end: float) -> list[int]:
        """RR intervals of the beats completed up to emulated time t_end."""
        out: list[int] = []
        while True:
            bout = self._track.at(self._t)
            target = {
                Activity.STANDING: RESTING_BPM,
                Activity.WALKING: WALKING_BPM,
                Activity.RUNNING: RUNNING_BPM,
            }[bout.activity]
            rr_s = 60.0 / self._bpm
            effort = (self._bpm - RESTING_BPM) / (RUNNING_BPM - RESTING_BPM)
            rsa = (
                RSA_AMPLITUDE_MS
                * max(0.15, 1.0 - effort)
                * math.sin(2 * math.pi * self._t / BREATHING_PERIOD_S)
            )
            rr_ms = rr_s * 1000.0 + rsa + self._rng.gauss(0.0, BEAT_NOISE_MS)
            rr_ms = min(1500.0, max(330.0, rr_ms))
            if self._t + rr_ms / 1000.0 > t_end:
                return out
            self._t += rr_ms / 1000.0
            # Exponential approach to the target rate, plus a slow random drift.
            self._bpm += (target - self._bpm) * (rr_ms / 1000.0) / HR_TIME_CONSTANT_S
            self._bpm += self._rng.gauss(0.0, 0.3)
            # ~20 kJ/h at rest to ~2.5 MJ/h running: a rough HR-energy relation.
            self.energy_kj += (0.006 + 0.7 * max(0.0, effort)) * rr_ms / 1000.0
            out.append(round(rr_ms * 1024 / 1000.0))

    @property
    def bpm(self) -> int:
        return round(self._bpm)


class StrideModel:
    """Footpod values at an emulated time: cadence, speed, stride length, total distance."""

    def __init__(self, seed: int, track: ActivityTrack) -> None:
        self._rng = random.Random(seed)
        self._track = track
        self._t = 0.0
        self.distance_m = 0.0

    def sample(self, t: float) -> tuple[Bout, float, float]:
        """(bout, cadence steps/min, speed m/s) at t, with stride-to-stride jitter."""
        bout = self._track.at(t)
        dt = max(0.0, t - self._t)
        self._t = t
        if bout.cadence_per_min == 0:
            return bout, 0.0, 0.0
        cadence = max(0.0, bout.cadence_per_min + self._rng.gauss(0.0, 2.0))
        speed = max(0.0, bout.speed_m_per_s + self._rng.gauss(0.0, 0.05))
        self.distance_m += speed * dt
        return bout, cadence, speed

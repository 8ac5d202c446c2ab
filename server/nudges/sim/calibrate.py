"""Calibrating the simulator to HeartSteps V1's decision-point figures, on randomized arms only.

    python -m pulsesync.server.nudges.sim.calibrate [--people 100] [--seeds 7 8 9] [--days 42]

`check` runs the trial's own design without a server (sim/direct.py: five daily decision
points, at each available one a walking suggestion with probability 0.3, an anti-sedentary one
with 0.3, nothing with 0.4; six weeks) for each seed, pools the decision points (people of
different seeds are different people) and tests every row of trial.TRIAL: each simulated
figure inside the trial's interval, the headline ones within 30% of the trial's point. A
figure from 37 people is as uncertain as the trial's own (its intervals are that wide), so the
check uses a larger cohort: it tests what the simulator does on average, not one draw.

`server_check` computes the same rows from a server-driven p=0.6 randomized arm (the bench's).
That arm differs from the trial's design on purpose: the catalog offers an anti-sedentary
suggestion only after 45 sitting minutes and adds sedentary-triggered decision points, and its
28 days hold no weeks 5 and 6; the bench prints its rows beside the check.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

from pulsesync.server.nudges.sim.behavior import BASE_RESPONSE
from pulsesync.server.nudges.sim.direct import SLOTS, trial_points
from pulsesync.server.nudges.sim.runner import ArmResult
from pulsesync.server.nudges.sim.trial import Check, Point, compare, figures, table

TRIAL_DAYS: Final = 42  # HeartSteps V1: six weeks
# The check's default cohort: 3 seeds x 100 people (~12,000 available decision points).
PEOPLE: Final = 100
SEEDS: Final = (7, 8, 9)
SLOT_OF: Final = {m: i for i, m in enumerate(SLOTS, 1)}


@dataclass(frozen=True, slots=True)
class Calibration:
    """Every trial row against the simulator, and whether all of them pass."""

    checks: list[Check]
    people: int
    seeds: tuple[int, ...]
    days: int
    points: int

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per row: figure, trial point, accepted range, simulated, ok."""
        return [
            {
                "figure": c.row.name,
                "trial": c.row.point,
                "low": round(c.row.low, 4),
                "high": round(c.row.high, 4),
                "simulated": round(c.simulated, 4),
                "ok": c.ok,
            }
            for c in self.checks
        ]

    def table(self) -> str:
        return table(self.checks)


def _seed_points(
    n_people: int, seed: int, days: int, base_response: Mapping[str, float]
) -> list[Point]:
    # People of different seeds are different people: keep their ids apart.
    return [
        Point(p.person + 100_000 * seed, p.slot, p.week, p.chosen, p.steps_after)
        for p in trial_points(n_people, days, seed, base_response)
    ]


def check(
    n_people: int = PEOPLE,
    seeds: Sequence[int] = SEEDS,
    days: int = TRIAL_DAYS,
    base_response: Mapping[str, float] = BASE_RESPONSE,
    jobs: int = 1,
) -> Calibration:
    """The trial-design randomized arm for each seed, pooled, against every trial row."""
    if jobs > 1:
        # Spawned, not forked: a process that already runs gRPC threads must not fork.
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(
                pool.map(
                    _seed_points,
                    [n_people] * len(seeds),
                    seeds,
                    [days] * len(seeds),
                    [dict(base_response)] * len(seeds),
                )
            )
    else:
        parts = [_seed_points(n_people, s, days, base_response) for s in seeds]
    pts = [p for part in parts for p in part]
    return Calibration(compare(figures(pts)), n_people, tuple(seeds), days, len(pts))


def server_points(r: ArmResult) -> list[Point]:
    """A server-driven randomized arm's scheduled decision points with a choice, as Points."""
    out = []
    for i, minute, _v, options, chosen, _p, outcome, *_ in r.decisions:
        slot = SLOT_OF.get(int(minute) % 1440)
        opts = json.loads(options) if isinstance(options, str) else options
        if slot is None or len(opts) < 2:  # a trigger, or not available (nothing to randomize)
            continue
        out.append(Point(int(i), slot, int(minute) // (7 * 1440) + 1, str(chosen), float(outcome)))
    return out


def server_check(r: ArmResult) -> list[Check]:
    """Every trial row computed from a server-driven randomized arm."""
    return compare(figures(server_points(r)))


def main() -> int:
    """Run the check and print the table (trial vs simulator)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--people", type=int, default=PEOPLE)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--days", type=int, default=TRIAL_DAYS)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    cal = check(args.people, args.seeds, args.days, jobs=args.jobs)
    print(
        f"{cal.points} available decision points, {args.people} people x seeds {args.seeds},"
        f" {args.days} days"
    )
    print(cal.table())
    print(
        json.dumps(
            {"calibration_ok": cal.ok, "failed": [c.row.name for c in cal.checks if not c.ok]}
        )
    )
    return 0 if cal.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

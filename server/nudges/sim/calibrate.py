"""Calibrating the simulator's response to HeartSteps, on the p=0.6 randomized arm only.

    python -m pulsesync.server.nudges.sim.calibrate [--people 24 32 40] [--seeds 7 8 9]

Runs only the randomized arm (never a learned policy) for every population size and seed,
and prints the HeartSteps figures it shows: the relative increase of steps in the 30 minutes
after a decision point at which an activity suggestion was sent, realized (from the simulated
walks) and expected (response probability x mean walk, which removes the coin flips of who
responded). The response probability is `base x multiplier(person, context, habituation)`, so
the expected effect is linear in the two base rates; the base rates that put the pooled
expected effects at the centre of HeartSteps' figures are solved for and printed. A second
run with those rates checks them (decisions depend on earlier responses, a second-order effect).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pulsesync.server.nudges.sim.behavior import BASE_RESPONSE, expected_walk_steps, people
from pulsesync.server.nudges.sim.runner import ArmResult, run_arm_blocking
from pulsesync.server.nudges.sim.trial import Point, compare, figures

# The five daily decision points (catalog schedule, local minutes) -> HeartSteps slot 1-5.
SLOT_OF: Final = {510: 1, 735: 2, 930: 3, 1080: 4, 1230: 5}

WALK: Final = "walking_suggestion"
BREAK: Final = "break_from_sitting"
ACTIVITY: Final = (WALK, BREAK)
# HeartSteps (Klasnja et al. 2019): activity suggestions +14% steps in the next 30 minutes,
# walking suggestions +24%; anti-sedentary suggestions alone showed no clear effect.
TARGET_ALL: Final = 0.14
TARGET_WALK: Final = 0.24
TOLERANCE: Final = 0.30  # the check: within 30% of each figure


@dataclass(frozen=True, slots=True)
class Sums:
    """Per suggestion type over a window: baseline steps, realized and expected added steps."""

    base: dict[str, float]
    realized: dict[str, float]
    expected: dict[str, float]
    per_unit: dict[str, float]  # expected added steps per unit of base rate (sum mult x walk)
    sent: dict[str, int]

    def effect(self, types: Sequence[str], which: str = "realized") -> float:
        """Relative increase for the sends of these types (realized or expected)."""
        got = self.realized if which == "realized" else self.expected
        base = sum(self.base.get(t, 0.0) for t in types)
        return sum(got.get(t, 0.0) for t in types) / base if base else float("nan")


def sums(r: ArmResult, lo_min: int, hi_min: int) -> Sums:
    """Sums over the randomized arm's decisions in [lo, hi) that sent an activity suggestion."""
    resp = {(i, m): (p, mult) for i, m, _t, p, mult in r.responses}
    out = Sums({}, {}, {}, {}, {})
    for i, minute, _v, _o, chosen, _p, outcome in r.decisions:
        if chosen not in ACTIVITY or not lo_min <= minute < hi_min:
            continue
        add = float(r.added[i, minute : minute + 30].sum())
        p, mult = resp.get((i, minute), (0.0, 0.0))  # not delivered: no response possible
        walk = expected_walk_steps(chosen)
        for d, v in (
            (out.base, outcome - add),
            (out.realized, add),
            (out.expected, p * walk),
            (out.per_unit, mult * walk),
        ):
            d[chosen] = d.get(chosen, 0.0) + v
        out.sent[chosen] = out.sent.get(chosen, 0) + 1
    return out


def points(r: ArmResult) -> list[Point]:
    """The randomized arm's scheduled decision points with a choice, as trial.Point rows."""
    out = []
    for i, minute, _v, options, chosen, _p, outcome, *_ in r.decisions:
        slot = SLOT_OF.get(int(minute) % 1440)
        opts = json.loads(options) if isinstance(options, str) else options
        if slot is None or len(opts) < 2:  # a trigger, or not available (nothing to randomize)
            continue
        out.append(Point(int(i), slot, int(minute) // (7 * 1440) + 1, str(chosen), float(outcome)))
    return out


def trial_check(r: ArmResult) -> list[dict[str, Any]]:
    """Every HeartSteps V1 row (trial.TRIAL) against this randomized arm: figure, range, ok."""
    return [
        {
            "figure": c.row.name,
            "trial": c.row.point,
            "low": round(c.row.low, 4),
            "high": round(c.row.high, 4),
            "simulated": round(c.simulated, 4),
            "ok": c.ok,
        }
        for c in compare(figures(points(r)))
    ]


def check(r: ArmResult, days: int) -> dict[str, Any]:
    """The HeartSteps figures of a randomized arm (the bench prints these), and every trial
    row checked (`trial`: figure, trial point, accepted range, simulated, ok; `ok_trial`)."""
    end = days * 1440
    whole, first, last = sums(r, 0, end), sums(r, 0, 7 * 1440), sums(r, end - 7 * 1440, end)
    all_, walking = whole.effect(ACTIVITY), whole.effect((WALK,))
    fig: dict[str, Any] = {
        "all": all_,
        "walking": walking,
        "break": whole.effect((BREAK,)),
        "all_expected": whole.effect(ACTIVITY, "expected"),
        "walking_expected": whole.effect((WALK,), "expected"),
        "walking_first_week": first.effect((WALK,)),
        "walking_last_week": last.effect((WALK,)),
        "walking_first_week_expected": first.effect((WALK,), "expected"),
        "walking_last_week_expected": last.effect((WALK,), "expected"),
        "sent": dict(whole.sent),
    }
    fig["ok_all"] = within(all_, TARGET_ALL)
    fig["ok_walking"] = within(walking, TARGET_WALK)
    fig["trial"] = trial_check(r)
    fig["ok_trial"] = all(row["ok"] for row in fig["trial"])
    return fig


def within(value: float, target: float) -> bool:
    """The issue's check: within TOLERANCE of the HeartSteps figure."""
    return abs(value - target) <= TOLERANCE * target


def solve(pooled: Sums) -> dict[str, float]:
    """Base rates that put the pooled expected effects nearest HeartSteps' figures.

    walking = b_w U_w / B_w and all = (b_w U_w + b_b U_b) / (B_w + B_b), where U is the
    expected added steps per unit of base rate and B the baseline steps of those sends. Both
    centres (0.24, 0.14) are hit when that needs b_b >= 0. Otherwise (break sends hold too
    small a share of the baseline for "all" to fall to 0.14 while walking is at 0.24) b_b = 0,
    which is also HeartSteps' finding for anti-sedentary suggestions, all = s x walking with
    s = B_w / (B_w + B_b), and walking is set so both figures miss their centre by the same
    relative amount (the largest margin to both 30% bands): walking = 2 / (1/T_w + s/T_a).
    """
    b_w, b_b = pooled.base[WALK], pooled.base.get(BREAK, 0.0)
    u_w, u_b = pooled.per_unit[WALK], pooled.per_unit.get(BREAK, 0.0)
    rate_w = TARGET_WALK * b_w / u_w
    need = TARGET_ALL * (b_w + b_b) - rate_w * u_w
    if need >= 0.0 and u_b > 0.0:
        return {WALK: rate_w, BREAK: need / u_b}
    share = b_w / (b_w + b_b)
    walking = 2.0 / (1.0 / TARGET_WALK + share / TARGET_ALL)
    return {WALK: walking * b_w / u_w, BREAK: 0.0}


def pool(all_sums: Sequence[Sums]) -> Sums:
    """Sum several runs' sums."""
    out = Sums({}, {}, {}, {}, {})
    for s in all_sums:
        for dst, src in (
            (out.base, s.base),
            (out.realized, s.realized),
            (out.expected, s.expected),
            (out.per_unit, s.per_unit),
        ):
            for k, v in src.items():
                dst[k] = dst.get(k, 0.0) + v
    return out


def run_randomized(
    sizes: Sequence[int],
    seeds: Sequence[int],
    days: int,
    base_response: Mapping[str, float],
    jobs: int,
) -> list[tuple[int, int, ArmResult]]:
    """The randomized arm for every (size, seed), `jobs` at a time in worker processes."""
    with tempfile.TemporaryDirectory(dir=_fast_dir()) as tmp, ProcessPoolExecutor(jobs) as pool_:
        futures = [
            (n, seed, pool_.submit(run_arm_blocking, "randomized", f"{tmp}/{n}-{seed}", {
                "persons": people(n, seed), "days": days, "seed": seed,
                "base_response": dict(base_response)}))
            for n in sizes
            for seed in seeds
        ]  # fmt: skip
        return [(n, seed, f.result()) for n, seed, f in futures]


def _fast_dir() -> str | None:
    return "/dev/shm" if Path("/dev/shm").is_dir() else None


def main() -> int:
    """Run the calibration grid and print figures and solved base rates."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--people", type=int, nargs="+", default=[24, 32, 40])
    ap.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    ap.add_argument("--days", type=int, default=28)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--walking", type=float, default=BASE_RESPONSE[WALK])
    ap.add_argument("--break-rate", type=float, default=BASE_RESPONSE[BREAK])
    args = ap.parse_args()
    rates = {WALK: args.walking, BREAK: args.break_rate}
    runs = run_randomized(args.people, args.seeds, args.days, rates, args.jobs)
    end = args.days * 1440
    for n, seed, r in runs:
        fig = check(r, args.days)
        print(json.dumps({"people": n, "seed": seed, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in fig.items()}}))  # fmt: skip
    pooled = pool([sums(r, 0, end) for _, _, r in runs])
    print("pooled expected: all", round(pooled.effect(ACTIVITY, "expected"), 4), "walking",
          round(pooled.effect((WALK,), "expected"), 4), "realized: all",
          round(pooled.effect(ACTIVITY), 4), "walking", round(pooled.effect((WALK,)), 4))  # fmt: skip
    print("rates used", rates, "solved", {k: round(v, 5) for k, v in solve(pooled).items()})
    print("baseline share of break sends", round(pooled.base.get(BREAK, 0.0) / sum(pooled.base.values()), 3))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""How far can a cold start take the learned arm over the whole run? (no server)

For each seed, with the simulator's people and days applied directly at decision points
(sim/direct.py, the functions the server-driven bench uses), expected steps added per
person-day over the whole run for:

* the best fixed three-a-day schedule (sim/direct.best_schedule, as the bench searches it);
* each of the learned arm's cold starts (sim/runner.learned_catalog: "proportional", the
  bench's default, and "focused", sim/runner.trial_focus, at each send probability of
  --tops where the trial's effect is largest) kept on all along;
* that cold start to day --first-day, then a policy that knows the simulator's truth and sends
  at the best one or two of the same decision points each day (sim/direct.ceiling): what a
  model trained on that cold start could reach at best.

With --daily-cap N every cold start sends at most N nudges a person-day (policy.daily_cap).
With --knows person,moment also two a day knowing only part of the truth
(sim/direct.known_probability: the person's responsiveness but not the moment, or the
moment but not the person): which part a model would have to learn.

    python scripts/study_focused_cold_start.py [--seeds 7,8,9,10,11] [--people 80] [--days 28]
                                               [--first-day 10] [--tops 0.6,0.8]
                                               [--daily-cap N] [--knows person,moment]

About 20 s per seed on a 2-core machine. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import tomllib
from typing import Any

from pulsesync.server.nudges.catalog import load_catalog
from pulsesync.server.nudges.sim.behavior import day_plan, people
from pulsesync.server.nudges.sim.direct import best_schedule, ceiling, schedule_gain
from pulsesync.server.nudges.sim.runner import BLOCK_MIN, learned_catalog


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="7,8,9,10,11")
    ap.add_argument("--people", type=int, default=80)
    ap.add_argument("--days", type=int, default=28)
    ap.add_argument("--first-day", type=int, default=10)
    ap.add_argument(
        "--tops", default="0.6", help="the focused cold start's send probabilities in its band"
    )
    ap.add_argument(
        "--daily-cap",
        type=int,
        default=None,
        help="at most this many nudges per person per day in the cold start (policy.daily_cap)",
    )
    ap.add_argument(
        "--knows",
        default="",
        help="also two a day knowing only these parts of the truth (person, moment)",
    )
    args = ap.parse_args()
    partial = [k for k in args.knows.split(",") if k]
    for k in partial:
        if k not in ("person", "moment"):
            ap.error(f"--knows takes person and moment, not {k!r}")
    out: dict[str, Any] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        t = time.perf_counter()
        persons = people(args.people, seed)
        plans = [[day_plan(p, d, seed) for d in range(args.days)] for p in persons]
        schedule, _, _ = best_schedule(persons, args.days, seed)
        fixed, fixed_sent = schedule_gain(persons, plans, schedule)
        row: dict[str, Any] = {"fixed": [round(fixed, 1), round(fixed_sent, 2)]}
        print(f"seed {seed}: best fixed schedule {schedule} {fixed:.1f} at {fixed_sent:.2f}/day")
        starts = [("proportional", 0.6)] + [("focused", float(t)) for t in args.tops.split(",")]
        for name, top in starts:
            label_of = name if name == "proportional" else f"{name} {top:g}"
            # The cold starts as this study measured them: the catalog's cap, the sedentary trigger on.
            catalog = learned_catalog(
                1.0, cold_start=name, top=top, daily_cap=None, sedentary_trigger=True
            )
            policy = load_catalog(overrides=tomllib.loads(catalog)).policy
            # The runner decides at the end of the half-hour block holding each scheduled time.
            points = sorted({math.ceil(m / BLOCK_MIN) * BLOCK_MIN for m in policy.schedule_min})
            for label, first_day, per_day, knows in (
                ("kept on", args.days, 1, "all"),
                ("then one a day knowing the truth", args.first_day, 1, "all"),
                ("then two a day knowing the truth", args.first_day, 2, "all"),
                *((f"then two a day knowing the {k} only", args.first_day, 2, k) for k in partial),
            ):
                gain, sent = ceiling(
                    persons,
                    plans,
                    points,
                    policy.cold_start_probability,
                    first_day,
                    per_day,
                    args.daily_cap,
                    knows,
                )
                row[f"{label_of}: {label}"] = [round(gain, 1), round(sent, 2)]
                print(f"  {label_of:<14} {label:<34} {gain:6.1f} at {sent:.2f}/day")
        print(f"  ({time.perf_counter() - t:.0f} s)")
        out[str(seed)] = row
    print(json.dumps({"first_day": args.first_day, "people": args.people, "days": args.days,
                      "daily_cap": args.daily_cap, "knows": partial, "seeds": out}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

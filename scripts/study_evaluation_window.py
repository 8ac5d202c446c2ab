#!/usr/bin/env python
"""Which days should an off-policy estimate score? (policy.evaluation_days)

Runs the nudge bench's cold-start arm (the learned arm's catalog, never trained: a real
server over gRPC, sim/runner.py) for one seed, then on its log, for each training day D:

* "next days": the candidate trained on every decision before D, scored by DR on the
  decisions from D on. The log goes on under the cold start, so this is an unbiased estimate
  of the candidate's one-step gain over the cold start on the days it would have decided on.
* "last N": what the promotion gate would have seen at D with policy.evaluation_days = N
  (the cross-fitted estimate of training.evaluate_candidate, scoring the last N days before D;
  0: every day).

An estimate "covers" when its 95% interval holds the next days' point estimate.

    python scripts/study_evaluation_window.py [--seed 8] [--people 80] [--days 28]
                                              [--train-days 10,17,24] [--windows 0,7,10]
                                              [--data-dir DIR]

--data-dir keeps the arm's database there and, when it already holds one from an earlier
run, reuses it instead of simulating again. 10-15 minutes on a 2-core machine for 80 people
and 28 days. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from pulsesync.server.config import ServerConfig
from pulsesync.server.nudges.catalog import load_catalog
from pulsesync.server.nudges.model import recent_from
from pulsesync.server.nudges.ope import Estimate, evaluate_model, gate
from pulsesync.server.nudges.sim.behavior import people
from pulsesync.server.nudges.sim.runner import START, learned_catalog, run_arm
from pulsesync.server.nudges.training import cross_fitted, logged_decisions, train_model
from pulsesync.server.storage.backend import open_storage
from pulsesync.timeutil import US_PER_DAY


def _fmt(e: Estimate) -> str:
    return f"{e.value:+6.2f} [{e.low:+6.2f}, {e.high:+6.2f}]"


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--people", type=int, default=80)
    ap.add_argument("--days", type=int, default=28)
    ap.add_argument("--train-days", default="10,17,24", help="training days, comma-separated")
    ap.add_argument("--windows", default="0,7,10", help="evaluation_days values to compare")
    ap.add_argument("--data-dir", type=Path, help="keep (or reuse) the cold-start arm's data")
    args = ap.parse_args()
    train_days = [int(x) for x in args.train_days.split(",")]
    windows = [float(x) for x in args.windows.split(",")]
    if max(train_days) >= args.days:
        ap.error("every training day must come before --days")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data_dir or Path(tmp) / "cold_start"
        t0 = time.perf_counter()
        if not (folder / "pulsesync.db").exists():
            await run_arm(
                "cold_start",
                people(args.people, args.seed),
                args.days,
                args.seed,
                folder,
                # The learned arm this study measured: the trial prior at a budget of 1.
                catalog_text=learned_catalog(
                    1.0,
                    cold_start="proportional",
                    top=0.6,
                    daily_cap=None,
                    sedentary_trigger=True,
                    support_sends=None,
                ),
            )
            print(f"cold-start arm simulated in {time.perf_counter() - t0:.0f} s", flush=True)
        catalog = load_catalog(folder / "catalog.toml")
        async with open_storage(ServerConfig(data_dir=folder).store) as storage:
            decisions = await logged_decisions(storage.nudges)
    print(f"seed {args.seed}: {len(decisions)} decisions with outcomes (DR gain over the cold"
          " start, steps in 30 min per decision point)")  # fmt: skip
    rows: list[dict[str, Any]] = []
    for day in train_days:
        cut = START + day * US_PER_DAY
        before = [d for d in decisions if d.decision_us < cut]
        after = [d for d in decisions if d.decision_us >= cut]
        nxt = evaluate_model(train_model(before, catalog), None, after, catalog.policy)["dr_diff"]
        row: dict[str, Any] = {"train_day": day, "next_days": nxt.as_dict()}
        line = f"  day {day:2d}  next days {_fmt(nxt)}"
        for n in windows:
            est = cross_fitted(before, catalog, None, recent_from(before, n))
            dr, promoted = est["dr_diff"], gate(est)[0]
            covers = dr.low <= nxt.value <= dr.high
            row[f"last_{n:g}"] = {**dr.as_dict(), "covers": covers, "promoted": promoted}
            line += (f" | last {n:g}: {_fmt(dr)} {'covers' if covers else 'misses'},"
                     f" {'promoted' if promoted else 'kept'}")  # fmt: skip
        print(line, flush=True)
        rows.append(row)
    covered = {
        f"last_{n:g}": sum(r[f"last_{n:g}"]["covers"] for r in rows) for n in windows
    }  # fmt: skip
    print(json.dumps({"seed": args.seed, "people": args.people, "days": args.days,
                      "covered": covered, "of": len(rows), "rows": rows}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))

#!/usr/bin/env python
"""Nudge policy bench: learned vs HeartSteps-style randomized vs the best fixed schedule.

Every arm runs the same simulated people and days (same seed: common random numbers) against
its own real server over gRPC. Prints the HeartSteps calibration check first, then steps
gained per nudge, nudges per day, total outcome, where each arm's nudges land (the burden
they met, how evenly they are spread over people, their types, the time of day and the moment
they met), the off-policy estimate at promotion against its exact value on the decisions it
scored (the simulator knows every decision's expected steps under each action) and against
what happened afterwards (the learned arm's cold start kept on, an arm of its own, gives
that), decision latency under ingest load, and one JSON line.

    python scripts/bench_nudges.py [--people 80] [--days 28] [--seed 7] [--jobs 2] [--quick]
                                   [--daily-budget 1.7] [--cold-start focused|proportional]
                                   [--cold-start-top 0.9] [--evaluation-days DAYS]
                                   [--daily-cap 2] [--[no-]sedentary-trigger]
                                   [--support-sends 50] [--promote-first]
                                   [--prior-trial]

The arms run in `--jobs` worker processes (2: 15-35 minutes on a 2-core machine, as busy as
it is). The reference arms run their servers on tmpfs (/dev/shm, when there is one) because only their
policy outcomes are read; the learned arm, whose decision latency is reported, keeps its
database on disk with durable commits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pulsesync.server.nudges.sim.behavior import (
    Person,
    burden,
    burden_dose,
    expected_walk_steps,
    people,
    time_of_day,
)
from pulsesync.server.nudges.sim.calibrate import check, server_check
from pulsesync.server.nudges.sim.direct import best_schedule
from pulsesync.server.nudges.sim.runner import (
    LEARNED_BUDGET,
    LEARNED_COLD_START,
    LEARNED_DAILY_CAP,
    LEARNED_SEDENTARY_TRIGGER,
    LEARNED_SUPPORT_SENDS,
    LEARNED_TOP,
    ArmResult,
    fixed_catalog,
    hhmm,
    learned_catalog,
    run_arm_blocking,
)

# Reference arms first: with two workers the learned arm starts beside the cold-start arm and
# its latency probe (at its end) usually runs after the others have finished. The cold-start
# arm runs the learned arm's cold start all along: the off-policy estimate at promotion
# compares the candidate with that policy, so the gain realized afterwards is against it too.
# Sending nothing adds nothing by construction (common random numbers); `--with-none` runs
# that arm too.
ARMS = ("randomized", "fixed", "cold_start", "learned")
# Decisions of the latency probe (while another process uploads as fast as the server takes).
PROBE_DECISIONS = 1500


def caused_per_decision(r: ArmResult, lo: int, hi: int) -> float:
    """Mean steps the nudges caused in the 30 min after each decision point in [lo, hi)."""
    rows = [d for d in r.decisions if lo <= d[1] < hi]
    caused = sum(float(r.added[d[0], d[1] : d[1] + 30].sum()) for d in rows)
    return caused / len(rows) if rows else 0.0


def arm_stats(r: ArmResult, lo: int, hi: int, n_people: int) -> dict[str, float]:
    sent = [d for d in r.decisions if d[4] != "none" and lo <= d[1] < hi]
    days = (hi - lo) / 1440
    gained = float(r.added[:, lo:hi].sum())
    outcomes = [d[6] for d in r.decisions if lo <= d[1] < hi]
    # The same without the luck of the draw: each delivered nudge's exact response
    # probability times the mean walk it starts (a few dozen acted nudges per arm make the
    # realized figure swing by ~15%).
    expected = sum(
        prob * expected_walk_steps(kind)
        for _, minute, kind, prob, _ in r.responses
        if lo <= minute < hi
    )
    return {
        "nudges": len(sent),
        "nudges_per_day": len(sent) / (n_people * days),
        "steps_gained": gained,
        "steps_per_nudge": gained / len(sent) if sent else 0.0,
        "expected_steps_per_nudge": expected / len(sent) if sent else 0.0,
        "gained_per_person_day": gained / (n_people * days),
        "expected_gained_per_person_day": expected / (n_people * days),
        "mean_steps_30m": float(np.mean(outcomes)) if outcomes else 0.0,
    }


def where_sent(r: ArmResult, lo: int, hi: int, persons: Sequence[Person]) -> dict[str, float]:
    """Where an arm's nudges in [lo, hi) land: the mean burden multiplier they met (each
    person's dose replayed from all their delivered nudges, behavior.burden_dose), the share
    of them that went to the quarter of people sent the most, the share that were walking
    suggestions, the mean time-of-day multiplier they met (behavior.time_of_day), and the
    mean of what the moment did to them (busy, sitting, already walking, the device in use:
    the context multiplier over person, burden and time of day)."""
    last: dict[int, tuple[float, int]] = {}
    met: list[float] = []
    tod: list[float] = []
    moment: list[float] = []
    walking = 0
    per_person: dict[int, int] = {}
    for i, minute, kind, _, mult in sorted(r.responses, key=lambda x: (x[1], x[0])):
        before, after = burden_dose(last.get(i), minute)
        last[i] = (after, minute)
        if lo <= minute < hi:
            met.append(burden(before))
            tod.append(time_of_day(minute % 1440))
            moment.append(mult / (persons[i].responsiveness * met[-1] * tod[-1]))
            walking += kind == "walking_suggestion"
            per_person[i] = per_person.get(i, 0) + 1
    counts = sorted(per_person.values(), reverse=True)
    top = counts[: max(1, len(counts) // 4)]
    return {
        "burden": float(np.mean(met)) if met else 0.0,
        "top_quarter_share": sum(top) / max(1, sum(counts)),
        "walking_share": walking / max(1, len(met)),
        "time_of_day": float(np.mean(tod)) if tod else 0.0,
        "moment": float(np.mean(moment)) if moment else 0.0,
    }


BASELINES = ("randomized", "fixed")
GAIN_KEY = "expected_gained_per_person_day"


def judge(
    stats: dict[str, dict[str, float]], covered: bool, p99_ms: float, gated: bool = True
) -> dict[str, Any]:
    """The goal over one period's arm stats: at least the better baseline's expected steps
    per person-day, at no more nudges a day than either, >= 1.5x the randomized policy's
    expected steps per nudge, the DR interval covering the truth, decision p99 < 25 ms, and
    the promotion made by the gate (gated False: --promote-first, another question)."""
    learned = stats["learned"]
    best = max(BASELINES, key=lambda k: stats[k][GAIN_KEY])
    vs_best = learned[GAIN_KEY] - stats[best][GAIN_KEY]
    fewest = min(stats[k]["nudges_per_day"] for k in BASELINES)
    ratio = learned["expected_steps_per_nudge"] / max(
        stats["randomized"]["expected_steps_per_nudge"], 1e-9
    )
    met = (
        vs_best >= 0.0
        and learned["nudges_per_day"] <= fewest
        and ratio >= 1.5
        and covered
        and p99_ms < 25.0
        and gated
    )
    return {"best": best, "vs_best": vs_best, "fewest": fewest, "ratio": ratio, "met": met}


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--people", type=int, default=80)
    ap.add_argument("--days", type=int, default=28)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--train-day", type=int, default=10, help="first training of the learned arm")
    ap.add_argument("--retrain-every", type=int, default=7, help="days between trainings")
    ap.add_argument("--jobs", type=int, default=2, help="arms run in this many processes")
    ap.add_argument("--quick", action="store_true", help="8 people, 21 days (a smoke run)")
    ap.add_argument("--with-none", action="store_true", help="also run the send-nothing arm")
    ap.add_argument(
        "--daily-budget",
        type=float,
        default=LEARNED_BUDGET,
        help="the learned arm's nudges per person-day (policy.daily_budget)",
    )
    ap.add_argument(
        "--cold-start",
        choices=("proportional", "focused"),
        default=LEARNED_COLD_START,
        help="the learned arm's cold start (sim/runner.learned_catalog)",
    )
    ap.add_argument(
        "--cold-start-top",
        type=float,
        default=LEARNED_TOP,
        help="the learned arm's cold-start send probability where the trial's effect is largest",
    )
    ap.add_argument(
        "--evaluation-days",
        type=float,
        default=None,
        help="the learned arm's policy.evaluation_days (0: score every day; default: the catalog's)",
    )
    ap.add_argument(
        "--daily-cap",
        type=int,
        default=LEARNED_DAILY_CAP,
        help="the learned arm's policy.daily_cap (nudges per person per day; 0: the catalog's)",
    )
    ap.add_argument(
        "--sedentary-trigger",
        action=argparse.BooleanOptionalAction,
        default=LEARNED_SEDENTARY_TRIGGER,
        help="the learned arm also decides when someone has sat for an hour (off: only at its"
        " schedule's times, as the fixed arm does)",
    )
    ap.add_argument(
        "--support-sends",
        type=float,
        default=LEARNED_SUPPORT_SENDS,
        help="the learned arm's policy.support_sends (a type's effect in a quarter of the day"
        " scaled by n / (n + this), n its nudges there in the log; 0: the catalog's)",
    )
    ap.add_argument(
        "--promote-first",
        action="store_true",
        help="the learned arm promotes its first candidate whatever the gate says (a diagnostic:"
        " what the model adds once deployed; the goal is then not judged met)",
    )
    ap.add_argument(
        "--prior-trial",
        action="store_true",
        help="start the learned arm from an earlier trial's log: a randomized arm run first on"
        " other simulated people (seed + 1000), exported and imported before day 0",
    )
    args = ap.parse_args()
    if args.quick:
        args.people, args.days, args.train_day = 8, 21, 10
    arms = ("none", *ARMS) if args.with_none else ARMS
    logging.disable(logging.WARNING)
    persons = people(args.people, args.seed)
    t0 = time.perf_counter()
    # The simulator against every trial row (trial design, six weeks, 3 seeds x 100 people).
    cal = await asyncio.to_thread(check, jobs=max(1, args.jobs))
    # The best fixed three-a-day schedule for these people and days, searched in the
    # simulator itself (expected steps from the first training on), then run as the fixed arm.
    schedule, schedule_gain, shortlist = await asyncio.to_thread(
        best_schedule, persons, args.days, args.seed, args.train_day
    )
    times = [hhmm(m) for m in schedule]
    print(f"best fixed schedule {times}: {schedule_gain:.1f} expected steps/person-day from day"
          f" {args.train_day} (searched in {time.perf_counter() - t0:.0f} s; next: "
          + ", ".join(f"{'/'.join(hhmm(m) for m in c)} {g:.1f}" for c, g in shortlist[1:4])
          + ")", flush=True)  # fmt: skip
    catalogs = {"fixed": fixed_catalog(times)}
    catalogs["learned"] = catalogs["cold_start"] = learned_catalog(
        args.daily_budget,
        cold_start=args.cold_start,
        top=args.cold_start_top,
        evaluation_days=args.evaluation_days,
        daily_cap=args.daily_cap or None,
        sedentary_trigger=args.sedentary_trigger,
        support_sends=args.support_sends or None,
    )
    results: dict[str, ArmResult] = {}
    shm = "/dev/shm" if await asyncio.to_thread(os.path.isdir, "/dev/shm") else None
    loop = asyncio.get_running_loop()
    with (
        tempfile.TemporaryDirectory() as tmp,
        tempfile.TemporaryDirectory(dir=shm) as fast,
        ProcessPoolExecutor(max(1, args.jobs)) as pool,
    ):
        prior = Path(tmp) / "prior.jsonl" if args.prior_trial else None
        prior_done = asyncio.Event()
        if prior is None:
            prior_done.set()

        async def trial() -> None:
            """The earlier trial: the randomized design on other people, its log exported."""
            assert prior is not None
            t = time.perf_counter()
            kwargs = {"persons": people(args.people, args.seed + 1000), "days": args.days,
                      "seed": args.seed + 1000, "export_log": prior}  # fmt: skip
            await loop.run_in_executor(
                pool, run_arm_blocking, "randomized", str(Path(fast) / "prior"), kwargs
            )
            print(f"earlier trial {time.perf_counter() - t:6.1f} s  (randomized, other people) -> {prior.name}", flush=True)  # fmt: skip
            prior_done.set()

        async def one(name: str) -> None:
            if name == "learned":
                await prior_done.wait()
            t = time.perf_counter()
            kwargs = {"persons": persons, "days": args.days, "seed": args.seed,
                      "train_day": args.train_day, "retrain_every": args.retrain_every,
                      "latency_probe": PROBE_DECISIONS if name == "learned" else 0,
                      "catalog_text": catalogs.get(name),
                      "prior_log": prior if name == "learned" else None,
                      "promote_first": args.promote_first and name == "learned"}  # fmt: skip
            workdir = str(Path(tmp if name == "learned" else fast) / name)
            r = results[name] = await loop.run_in_executor(
                pool, run_arm_blocking, name, workdir, kwargs
            )
            print(f"arm {name:<10} {time.perf_counter() - t:6.1f} s  {r.events} events uploaded over gRPC, "
                  f"{len(r.decisions)} decisions, {sum(r.nudges_sent.values())} nudges", flush=True)  # fmt: skip

        order = [one(name) for name in arms]
        if prior is not None:  # first, beside the randomized arm; the learned arm waits for it
            order.insert(1, trial())
        await asyncio.gather(*order)
    results = {name: results[name] for name in arms}
    end = args.days * 1440
    rnd = results["randomized"]
    arm_rows = {c.row.name: c for c in server_check(rnd)}
    print(
        "\nHeartSteps V1 decision-point figures: trial vs the simulator (trial design, six weeks,"
        f" {cal.points} decision points; sim/calibrate.py) and vs this bench's randomized arm"
        " (the catalog's eligibility, 28 days):"
    )
    for c in cal.checks:
        a = arm_rows[c.row.name]
        print(f"  {c.row.name:<16} trial {c.row.point:+9.3f}  range [{c.row.low:+.3f}, {c.row.high:+.3f}]"
              f"  simulator {c.simulated:+9.3f} {'OK' if c.ok else 'OUTSIDE'}"
              f"   bench arm {a.simulated:+9.3f} {'ok' if a.ok else 'outside'}")  # fmt: skip
    print(f"  calibration check: {'every row passes' if cal.ok else 'FAILED'}")

    learned = results["learned"]
    lo = learned.promote_minute if learned.promote_minute is not None else args.train_day * 1440
    print(
        f"\nComparison window: day {lo / 1440:.1f} to day {args.days} (from the learned arm's first promotion, or its first training if none)"
    )
    stats = {name: arm_stats(r, lo, end, args.people) for name, r in results.items()}
    print(
        f"  {'arm':<11}{'nudges/day':>11}{'steps/nudge':>13}{'expected':>10}{'gained/person-day':>19}{'mean steps 30m':>16}"
    )
    for name, s in stats.items():
        print(
            f"  {name:<11}{s['nudges_per_day']:>11.2f}{s['steps_per_nudge']:>13.1f}{s['expected_steps_per_nudge']:>10.1f}"
            f"{s['gained_per_person_day']:>19.1f} ({s['expected_gained_per_person_day']:.1f}){s['mean_steps_30m']:>16.1f}"
        )
    spread = {name: where_sent(r, lo, end, persons) for name, r in results.items()}
    print(
        "  where the nudges land: mean burden multiplier met (1 = a person never nudged),"
        " share to the quarter of people sent the most, walking suggestions' share, mean"
        " time-of-day multiplier, mean multiplier of the moment (busy, sitting, walking, device):"
    )
    for k, v in spread.items():
        print(f"    {k:<11}{v['burden']:>7.3f}{v['top_quarter_share']:>6.0%}{v['walking_share']:>6.0%}"
              f"{v['time_of_day']:>7.2f}{v['moment']:>7.2f}")  # fmt: skip
    ratio = stats["learned"]["steps_per_nudge"] / max(stats["randomized"]["steps_per_nudge"], 1e-9)
    ratio_expected = stats["learned"]["expected_steps_per_nudge"] / max(
        stats["randomized"]["expected_steps_per_nudge"], 1e-9
    )
    fewer = stats["learned"]["nudges_per_day"] <= stats["randomized"]["nudges_per_day"]
    print(
        f"  vs_randomized: {ratio:.2f}x steps per nudge ({ratio_expected:.2f}x expected) at "
        f"{'no more' if fewer else 'MORE'} nudges per day (goal >= 1.5x)"
    )

    ope: dict[str, Any] = {}
    for ev in learned.extra.get("evaluations", []):
        d, net = ev["dr_diff"], ev["net_diff"]
        print(f"  training on day {ev['minute'] / 1440:.0f}: {ev['decisions']} decisions, DR gain over {ev['against']} "
              f"{d['value']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}], net of the nudges' cost "
              f"{net['value']:+.2f} [{net['low']:+.2f}, {net['high']:+.2f}] steps/decision point, "
              f"send threshold {ev.get('send_threshold') or 0:.1f}, "
              f"effective decisions {ev.get('effective_decisions', {}).get('value', 0):.0f}  "
              f"{('PROMOTED (forced)' if ev.get('forced') else 'PROMOTED') if ev['promoted'] else 'not promoted'}")  # fmt: skip
    if learned.evaluation is not None:
        ev = learned.evaluation
        # Two truths. What the estimate is of: the exact value, over the decisions it scored,
        # of the candidate's policy minus the current one (each decision's expected steps under
        # every action; runner.true_gain). And what happened afterwards: steps the nudges
        # caused in the 30 min after each decision point (exact, from common random numbers),
        # per decision point, learned minus the same cold start kept on, from the promotion on.
        cold = results["cold_start"]
        realized = caused_per_decision(learned, lo, end) - caused_per_decision(cold, lo, end)
        truth = ev.get("true_dr_diff")
        ope = {
            "dr_gain": ev["dr_diff"]["value"], "dr_gain_ci": [ev["dr_diff"]["low"], ev["dr_diff"]["high"]],
            "ips_gain": ev["ips_diff"]["value"], "snips_gain": ev["snips_diff"]["value"],
            "true_gain": truth, "ope_error": None if truth is None else ev["dr_diff"]["value"] - truth,
            "realized_gain": realized, "ope_error_realized": ev["dr_diff"]["value"] - realized,
        }  # fmt: skip
        print(
            "\nOff-policy estimate at promotion (gain over the cold start, steps in 30 min per"
            " decision point) vs its exact value on the decisions it scored, and vs the gain"
            " realized afterwards over the cold start kept on:"
        )
        exact = "n/a (imported decisions scored)" if truth is None else f"{truth:+.2f}"
        print(f"  DR {ev['dr_diff']['value']:+.2f} [{ev['dr_diff']['low']:+.2f}, {ev['dr_diff']['high']:+.2f}]"
              f"  IPS {ev['ips_diff']['value']:+.2f}  SNIPS {ev['snips_diff']['value']:+.2f}"
              f"  truth {exact}  realized afterwards {realized:+.2f}")  # fmt: skip
    else:
        print(
            "\nThe learned arm never promoted a model (the estimate never showed it better);"
            f" training errors: {learned.extra.get('train_errors', [])}"
        )
    probe = learned.extra.get("probe", {})
    print(f"\nDecision latency under ingest load ({probe.get('ingest_events_per_s', 0):.0f} events/s uploading): "
          f"p50 {probe.get('p50_ms', 0):.2f} ms  p99 {probe.get('p99_ms', 0):.2f} ms (goal p99 < 25 ms)")  # fmt: skip
    lat_all = np.array(learned.latencies) * 1000
    print(
        f"All simulated decisions: p50 {np.percentile(lat_all, 50):.2f} ms  p99 {np.percentile(lat_all, 99):.2f} ms"
    )
    # The goal, in expectation (each delivered nudge's response probability x its mean act,
    # the coin flips of who acted removed; `judge`), from the first promotion on.
    best_realized = max(stats[k]["gained_per_person_day"] for k in BASELINES)
    vs_best_realized = stats["learned"]["gained_per_person_day"] - best_realized

    def within(value: float | None) -> bool:
        return (
            bool(ope)
            and value is not None
            and ope["dr_gain_ci"][0] <= value <= ope["dr_gain_ci"][1]
        )

    covered = within(ope.get("true_gain"))
    covered_realized = within(ope.get("realized_gain"))
    gated = not args.promote_first
    window = judge(stats, covered, probe.get("p99_ms", 0.0), gated)
    best, vs_best, fewest, goal = window["best"], window["vs_best"], window["fewest"], window["met"]
    print(
        f"Goal: expected gain vs best baseline ({best}) {vs_best:+.1f} steps/person-day"
        f" (realized {vs_best_realized:+.1f}), nudges/day"
        f" {stats['learned']['nudges_per_day']:.2f} (baselines' fewest {fewest:.2f}),"
        f" {ratio_expected:.2f}x expected steps/nudge, DR interval covers the truth: {covered}"
        f" (the gain realized afterwards: {covered_realized})"
        f"  -> {'MET' if goal else 'NOT MET'}"
    )
    # The same over the whole run, cold start included: the window above starts where the
    # learned arm's model takes over, after days in which every arm sent nudges at its own
    # rate (and, in this simulator, left people more or less responsive for the window).
    whole = {name: arm_stats(r, 0, end, args.people) for name, r in results.items()}
    # The same goal with every day counted: the cold start's days are the learned arm's too.
    whole_goal = judge(whole, covered, probe.get("p99_ms", 0.0), gated)
    best_whole, vs_best_whole = whole_goal["best"], whole_goal["vs_best"]
    ratio_whole, goal_whole = whole_goal["ratio"], whole_goal["met"]
    print(
        f"Whole run (day 0 to {args.days}, cold start included): expected steps/person-day "
        + ", ".join(
            f"{k} {v[GAIN_KEY]:.1f} at {v['nudges_per_day']:.2f}/day" for k, v in whole.items()
        )
        + f"; learned vs best baseline ({best_whole}) {vs_best_whole:+.1f},"
        f" {ratio_whole:.2f}x expected steps/nudge  -> {'MET' if goal_whole else 'NOT MET'}"
    )
    print(f"total {time.perf_counter() - t0:.0f} s")
    print(json.dumps({
        "trial_ok": cal.ok, "trial_failed": [c.row.name for c in cal.checks if not c.ok],
        "trial": {c.row.name: round(c.simulated, 4) for c in cal.checks},
        "bench_arm_trial_failed": [k for k, c in arm_rows.items() if not c.ok],
        "fixed_schedule": times,
        "steps_per_nudge": {k: round(v["steps_per_nudge"], 1) for k, v in stats.items()},
        "nudges_per_day": {k: round(v["nudges_per_day"], 2) for k, v in stats.items()},
        "gained_per_person_day": {k: round(v["gained_per_person_day"], 1) for k, v in stats.items()},
        "expected_gained_per_person_day": {k: round(v[GAIN_KEY], 1) for k, v in stats.items()},
        "expected_steps_per_nudge": {k: round(v["expected_steps_per_nudge"], 1) for k, v in stats.items()},
        "burden_at_sends": {k: round(v["burden"], 4) for k, v in spread.items()},
        "top_quarter_share": {k: round(v["top_quarter_share"], 3) for k, v in spread.items()},
        "walking_share": {k: round(v["walking_share"], 3) for k, v in spread.items()},
        "time_of_day_met": {k: round(v["time_of_day"], 3) for k, v in spread.items()},
        "moment_met": {k: round(v["moment"], 3) for k, v in spread.items()},
        "vs_randomized": round(ratio, 3), "vs_randomized_expected": round(ratio_expected, 3),
        "no_more_nudges": fewer, "promoted_day": lo / 1440 if learned.promote_minute is not None else None,
        "ope": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in ope.items()},
        "ope_error": round(ope["ope_error"], 2) if ope and ope["ope_error"] is not None else None,
        "ope_covered": covered,
        "ope_error_realized": round(ope["ope_error_realized"], 2) if ope else None,
        "ope_covered_realized": covered_realized, "vs_best_baseline_gained": round(vs_best, 1), "best_baseline": best,
        "vs_best_baseline_gained_realized": round(vs_best_realized, 1),
        "goal_met": goal,
        "whole_run": {
            "expected_gained_per_person_day": {k: round(v[GAIN_KEY], 1) for k, v in whole.items()},
            "nudges_per_day": {k: round(v["nudges_per_day"], 2) for k, v in whole.items()},
            "vs_best_baseline_gained": round(vs_best_whole, 1), "best_baseline": best_whole,
            "vs_randomized_expected": round(ratio_whole, 3), "goal_met": goal_whole,
        },
        "decision_p50_ms": round(probe.get("p50_ms", 0.0), 2), "decision_p99_ms": round(probe.get("p99_ms", 0.0), 2),
        "daily_budget": args.daily_budget, "cold_start": args.cold_start, "cold_start_top": args.cold_start_top,
        "evaluation_days": args.evaluation_days, "promote_first": args.promote_first,
        "daily_cap": args.daily_cap, "sedentary_trigger": args.sedentary_trigger,
        "support_sends": args.support_sends,
        "send_thresholds": [round(ev.get("send_threshold") or 0.0, 1) for ev in learned.extra.get("evaluations", [])],
        "people": args.people, "days": args.days, "seed": args.seed, "prior_trial": args.prior_trial,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))

#!/usr/bin/env python
"""Run simulated people against a real in-process server under one policy arm.

    python scripts/simulate_users.py --arm randomized --people 8 --days 14 [--keep DIR]

With --keep, the server's data folder (its database, models included) stays for inspection with
`pulsesync nudges status --data-dir DIR/<arm>`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
from pathlib import Path

from pulsesync.server.nudges.sim.behavior import people
from pulsesync.server.nudges.sim.runner import ARM_CATALOGS, run_arm


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arm", choices=sorted(ARM_CATALOGS), default="randomized")
    ap.add_argument("--people", type=int, default=8)
    ap.add_argument("--days", type=int, default=14)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--train-day", type=int, default=10)
    ap.add_argument(
        "--keep", type=Path, default=None, help="keep the server data under this folder"
    )
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        r = await run_arm(
            args.arm,
            people(args.people, args.seed),
            args.days,
            args.seed,
            root / args.arm,
            train_day=args.train_day,
        )
    sent = sum(r.nudges_sent.values())
    print(f"{args.arm}: {r.events} events uploaded, {len(r.decisions)} decisions with outcomes, {sent} nudges "
          f"({sent / (args.people * args.days):.2f} per person-day), {int(r.added.sum())} steps added by responses")  # fmt: skip
    for ev in r.extra.get("evaluations", []):
        print(
            f"  model v{ev['version']}: DR gain {ev['dr_diff']['value']:+.1f} [{ev['dr_diff']['low']:+.1f}, {ev['dr_diff']['high']:+.1f}] promoted={ev['promoted']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))

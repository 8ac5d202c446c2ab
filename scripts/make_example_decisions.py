"""Write docs/examples/decisions.csv: a small synthetic decision log in pulsesync-decisions/1.

HeartSteps-like design: 12 people x 5 days x the five daily decision points, available ~80% of
the time, randomized with p = 0.6 (0.3 walking, 0.3 a break from sitting); the outcome (steps in
the 30 minutes after) is lognormal around ~235 steps, raised ~30% by a walking suggestion at
lunch and mid-afternoon. Synthetic numbers, not trial data: the file shows the format.

    python scripts/make_example_decisions.py [OUT]
"""

from __future__ import annotations

import csv
import math
import random
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pulsesync.server.nudges.importlog import CSV_HEADER_LINE

SLOTS = (510, 735, 930, 1080, 1230)  # local minutes of the five daily decision points
PROBS = {"none": 0.4, "walking_suggestion": 0.3, "break_from_sitting": 0.3}


def main(out: Path) -> None:
    rng = random.Random(17)
    tz = timezone(timedelta(hours=-7))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as f:
        f.write(CSV_HEADER_LINE + "\n")
        w = csv.writer(f, lineterminator="\n")
        w.writerow(
            ["person", "decision_time", "available", "options", "chosen", "probability",
             "outcome_steps", "steps_30", "sedentary_min"]
        )  # fmt: skip
        for person in range(1, 13):
            level = rng.gauss(5.0, 0.3)  # log of the person's typical 30-minute steps
            for day in range(5):
                for slot in SLOTS:
                    at = datetime(2015, 8, 3, tzinfo=tz) + timedelta(days=day, minutes=slot)
                    before = round(math.exp(rng.gauss(level, 1.0)))
                    sed = rng.randint(0, 120)
                    if rng.random() > 0.8:
                        w.writerow([f"p{person:02d}", at.isoformat(), 0, "none=1", "none", 1,
                                    before, before, sed])  # fmt: skip
                        continue
                    chosen = rng.choices(list(PROBS), weights=list(PROBS.values()))[0]
                    log_y = rng.gauss(level + 0.3 * math.log1p(before) - 1.6, 1.0)
                    if chosen == "walking_suggestion" and slot in (735, 930):
                        log_y += 0.3
                    options = ";".join(f"{a}={p}" for a, p in PROBS.items())
                    w.writerow([f"p{person:02d}", at.isoformat(), 1, options, chosen,
                                PROBS[chosen], round(math.exp(log_y)), before, sed])  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/examples/decisions.csv"))

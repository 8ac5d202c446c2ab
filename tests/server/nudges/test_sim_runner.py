"""The simulator's runner: one deployment's log starts another (export, import, first model)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from pulsesync.server.nudges.importlog import read_records
from pulsesync.server.nudges.sim.behavior import people
from pulsesync.server.nudges.sim.runner import START, learned_catalog, run_arm
from pulsesync.timeutil import US_PER_S


async def test_an_exported_log_is_imported_and_trained_on_before_the_first_day(
    tmp_path: Path,
) -> None:
    log = tmp_path / "earlier.jsonl"
    earlier = await run_arm(
        "randomized", people(8, 1007), 2, 1007, tmp_path / "earlier", export_log=log
    )
    records = list(read_records(log))
    assert len(records) == len(earlier.decisions) > 0
    # Dated to end before the next deployment starts.
    last = max(datetime.fromisoformat(r["decision_time"]) for _, r in records)
    assert last.timestamp() * US_PER_S < START

    catalog = learned_catalog() + "min_training_decisions = 20\n"
    later = await run_arm(
        "learned", people(8, 7), 1, 7, tmp_path / "later",
        train_day=5, catalog_text=catalog, prior_log=log,
    )  # fmt: skip
    assert later.extra["prior"] == {"decisions": len(records), "people": 8}
    (first,) = later.extra["evaluations"]  # before day 0 only: day 5 is never reached
    assert first["minute"] == 0
    assert first["against"] == "randomized"
    assert first["decisions"] == len(records)
    assert later.promote_minute == (0 if first["promoted"] else None)

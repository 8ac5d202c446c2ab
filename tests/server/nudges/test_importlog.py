"""Importing decisions logged elsewhere: the format, its validation, and the learning loop on it."""

from __future__ import annotations

import json
import random
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from pulsesync.server.cli import main as cli_main
from pulsesync.server.nudges.catalog import load_catalog
from pulsesync.server.nudges.importlog import (
    CSV_HEADER_LINE,
    LogFormatError,
    import_file,
    write_jsonl,
)
from pulsesync.server.nudges.training import logged_decisions
from pulsesync.server.storage.db import Database
from pulsesync.server.storage.sqlite.nudges import SqliteNudgeStorage

ACTIONS = load_catalog().actions
EXAMPLE = Path(__file__).parents[3] / "docs" / "examples" / "decisions.csv"
HEAD = "person,decision_time,available,options,chosen,probability,outcome_steps"
OPTS = "none=0.4;walking_suggestion=0.3;break_from_sitting=0.3"


def write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join([CSV_HEADER_LINE, HEAD, *lines]) + "\n", "utf-8")
    return path


async def test_the_shipped_example_imports_and_reads_like_the_servers_own_logs(
    tmp_path: Path,
) -> None:
    async with await Database.open(tmp_path / "db.sqlite") as db:
        summary = await import_file(SqliteNudgeStorage(db), EXAMPLE, ACTIONS)
        decisions = await logged_decisions(SqliteNudgeStorage(db))
        again = await import_file(
            SqliteNudgeStorage(db), EXAMPLE, ACTIONS
        )  # a re-import replaces, never doubles
        assert len(await logged_decisions(SqliteNudgeStorage(db))) == len(decisions)
    assert summary.people == 12
    assert again.stored == summary.stored
    assert summary.stored + summary.unavailable == summary.rows == 300
    assert len(decisions) == summary.stored
    assert all(d.user_id < 0 for d in decisions)
    assert [d.decision_us for d in decisions] == sorted(d.decision_us for d in decisions)
    d = decisions[0]
    assert set(d.options) == {"none", "walking_suggestion", "break_from_sitting"}
    assert d.probability == d.options[d.chosen]
    # The local minute comes from the time's own offset: 08:30 at -07:00.
    assert d.features["local_minute"] == 510.0


async def test_a_log_written_in_the_format_imports_back_the_same(tmp_path: Path) -> None:
    """write_jsonl (a deployment's own log, to start another from) is parse's inverse."""
    async with await Database.open(tmp_path / "db.sqlite") as db:
        await import_file(SqliteNudgeStorage(db), EXAMPLE, ACTIONS)
        first = await logged_decisions(SqliteNudgeStorage(db))
    week = 7 * 86_400_000_000
    out = tmp_path / "again.jsonl"
    assert write_jsonl(out, first, shift_us=-week) == len(first)
    async with await Database.open(tmp_path / "db2.sqlite") as db:
        summary = await import_file(SqliteNudgeStorage(db), out, ACTIONS)
        again = await logged_decisions(SqliteNudgeStorage(db))
    assert summary.stored == len(first)
    assert summary.people == 12
    assert [d.decision_us + week for d in again] == [d.decision_us for d in first]
    for a, b in zip(again, first, strict=True):
        assert (a.options, a.chosen, a.probability, a.outcome) == (
            b.options, b.chosen, b.probability, b.outcome
        )  # fmt: skip
        # The local minute travels as a column, not re-derived from the UTC time written.
        assert a.features == b.features


@pytest.mark.parametrize(
    ("line", "column", "what"),
    [
        (f"p1,2015-08-03T08:30:00-07:00,1,{OPTS},none,0,200", "probability", "outside (0, 1]"),
        (f"p1,2015-08-03T08:30:00-07:00,1,{OPTS},none,1.5,200", "probability", "outside (0, 1]"),
        (f"p1,2015-08-03T08:30:00-07:00,1,{OPTS},dance,0.3,200", "chosen", "not among"),
        (f"p1,2015-08-03T08:30:00,1,{OPTS},none,0.4,200", "decision_time", "no UTC offset"),
        (f"p1,2015-08-03T08:30:00-07:00,1,{OPTS},none,0.3,200", "probability", "differs"),
        (f"p1,2015-08-03T08:30:00-07:00,yes?,{OPTS},none,0.4,200", "available", "not 0/1"),
        (
            "p1,2015-08-03T08:30:00-07:00,1,none=0.5;walking_suggestion=0.3,none,0.5,200",
            "options",
            "add up to",
        ),
        (f"p1,2015-08-03T08:30:00-07:00,1,{OPTS},none,0.4,", "outcome_steps", "missing"),
    ],
)
async def test_a_bad_row_is_reported_with_its_line_and_column(
    tmp_path: Path, line: str, column: str, what: str
) -> None:
    good = f"p0,2015-08-03T08:30:00-07:00,1,{OPTS},none,0.4,200"
    path = write_csv(tmp_path / "log.csv", [good, line])
    async with await Database.open(tmp_path / "db.sqlite") as db:
        with pytest.raises(LogFormatError) as err:
            await import_file(SqliteNudgeStorage(db), path, ACTIONS)
        assert (
            await logged_decisions(SqliteNudgeStorage(db)) == []
        )  # nothing stored from an invalid file
    [(ln, col, message)] = err.value.problems
    assert (ln, col) == (4, column)
    assert what in message


async def test_times_out_of_order_per_person_and_a_wrong_version_are_refused(
    tmp_path: Path,
) -> None:
    rows = [
        f"p1,2015-08-03T12:15:00-07:00,1,{OPTS},none,0.4,200",
        f"p2,2015-08-03T08:30:00-07:00,1,{OPTS},none,0.4,200",  # another person: fine
        f"p1,2015-08-03T08:30:00-07:00,1,{OPTS},none,0.4,200",
    ]
    async with await Database.open(tmp_path / "db.sqlite") as db:
        with pytest.raises(LogFormatError, match=r"line 5, column 'decision_time'.*line 3"):
            await import_file(SqliteNudgeStorage(db), write_csv(tmp_path / "a.csv", rows), ACTIONS)
        wrong = tmp_path / "b.jsonl"
        wrong.write_text('{"format": "pulsesync-decisions", "version": 2}\n', "utf-8")
        with pytest.raises(LogFormatError, match=r"version 2 is not supported"):
            await import_file(SqliteNudgeStorage(db), wrong, ACTIONS)


async def test_a_byte_order_mark_is_read_past_and_a_non_utf8_byte_named_by_line(
    tmp_path: Path,
) -> None:
    rows = [f"p{i},2015-08-03T08:30:00-07:00,1,{OPTS},none,0.4,200" for i in range(3)]
    path = write_csv(tmp_path / "a.csv", rows)
    excel = tmp_path / "excel.csv"
    excel.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # a spreadsheet's UTF-8 export
    latin = tmp_path / "latin.csv"
    latin.write_bytes(path.read_bytes().replace(b"p2,", b"Zo\xeb,"))  # "Zoë" in Latin-1, line 5
    async with await Database.open(tmp_path / "db.sqlite") as db:
        assert (await import_file(SqliteNudgeStorage(db), excel, ACTIONS)).stored == 3
        with pytest.raises(LogFormatError) as err:
            await import_file(SqliteNudgeStorage(db), latin, ACTIONS)
    assert err.value.problems == [(5, "encoding", "byte 0xeb is not UTF-8; save the file as UTF-8")]


def trial_jsonl(path: Path, people: int, days: int, seed: int) -> Path:
    """A randomized trial's log in JSON Lines: walking adds ~120 steps when sedentary > 60."""
    rng = random.Random(seed)
    tz = timezone(timedelta(hours=2))
    probs = {"none": 0.4, "walking_suggestion": 0.3, "break_from_sitting": 0.3}
    lines: list[dict[str, Any]] = [{"format": "pulsesync-decisions", "version": 1}]
    for p in range(people):
        for day in range(days):
            for slot in (510, 735, 930, 1080, 1230):
                at = datetime(2024, 3, 4, tzinfo=tz) + timedelta(days=day, minutes=slot)
                sed = rng.uniform(0, 120)
                chosen = rng.choices(list(probs), weights=list(probs.values()))[0]
                y = max(0.0, rng.gauss(230 + sed, 120))
                if chosen == "walking_suggestion" and sed > 60:
                    y += 120
                lines.append(
                    {
                        "person": f"u{p}",
                        "decision_time": at.isoformat(),
                        "available": True,
                        "options": probs,
                        "chosen": chosen,
                        "probability": probs[chosen],
                        "outcome_steps": round(y),
                        "sedentary_min": sed,
                    }
                )
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", "utf-8")
    return path


def test_train_and_evaluate_on_an_imported_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--data-dir", str(tmp_path)]
    log = trial_jsonl(tmp_path / "trial.jsonl", 12, 40, 5)
    assert cli_main(["nudges", "import-log", str(log), *flags]) == 0
    assert "imported 2400 decisions of 12 people" in capsys.readouterr().out
    assert cli_main(["nudges", "train", *flags]) == 0
    assert cli_main(["nudges", "evaluate", *flags]) == 0
    out = capsys.readouterr().out
    for name in ("IPS", "SNIPS", "DR", "NET"):
        assert f"  {name} " in out
    assert "support: 100%" in out
    effective = re.search(r"effective decisions: (\d+) of 432 ", out)
    assert effective is not None, out
    assert 0 < int(effective[1]) <= 432, out
    assert "gate: net gain" in out
    # 40 days logged, the last 7 scored (policy.evaluation_days): each person's 35 decision
    # points of days 33-39 and day 32's last, at exactly 7 days before the latest decision.
    assert "on 432 held-out decisions" in out
    assert "policy.evaluation_days = 7" in out
    # Trained with a holdout, the candidate is scored on it, whatever evaluation_days says.
    assert cli_main(["nudges", "train", "--holdout", "0.25", *flags]) == 0
    assert cli_main(["nudges", "evaluate", *flags]) == 0
    out = capsys.readouterr().out
    assert "(the candidate's holdout: it was trained on the decisions before)" in out
    assert "evaluation_days" not in out


def test_train_refuses_a_holdout_that_is_not_a_fraction_or_leaves_too_little(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--data-dir", str(tmp_path)]
    log = trial_jsonl(tmp_path / "t.jsonl", 12, 10, 5)  # 600 decisions
    assert cli_main(["nudges", "import-log", str(log), *flags]) == 0
    for holdout in ("1.5", "nan", "-0.1", "1"):
        with pytest.raises(
            SystemExit, match=r"cannot train: the holdout must be a fraction in \[0, 1\)"
        ):
            cli_main(["nudges", "train", f"--holdout={holdout}", *flags])
    with pytest.raises(
        SystemExit,
        match=r"a holdout of 0.6 leaves 240 of 600 decisions to train on; training needs 300",
    ):
        cli_main(["nudges", "train", "--holdout=0.6", *flags])
    assert cli_main(["nudges", "train", "--holdout=0.25", *flags]) == 0
    assert "trained on 450 decisions" in capsys.readouterr().out


def test_evaluate_caps_importance_weights_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--data-dir", str(tmp_path)]
    assert (
        cli_main(
            ["nudges", "import-log", str(trial_jsonl(tmp_path / "t.jsonl", 12, 40, 5)), *flags]
        )
        == 0
    )
    assert cli_main(["nudges", "train", *flags]) == 0
    lines = {}
    for clip in ([], ["--clip", "1.5"]):
        assert cli_main(["nudges", "evaluate", *clip, *flags]) == 0
        out = capsys.readouterr().out
        lines[bool(clip)] = next(line for line in out.splitlines() if line.startswith("  IPS "))
        assert ("importance weights capped at 1.5" in out) == bool(clip)
    # A send logged with 0.3 weighs 1/0.3 where the candidate sends: capped at 1.5, IPS moves.
    assert lines[True] != lines[False]
    with pytest.raises(
        SystemExit, match=r"cannot evaluate: weight clip 0.5 must be a finite number >= 1"
    ):
        cli_main(["nudges", "evaluate", "--clip", "0.5", *flags])


def test_import_log_cli_prints_each_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_csv(tmp_path / "log.csv", [f"p1,2015-08-03T08:30:00-07:00,1,{OPTS},none,0,200"])
    with pytest.raises(SystemExit, match=r"line 3, column 'probability': 0.0 is outside \(0, 1\]"):
        cli_main(["nudges", "import-log", str(path), "--data-dir", str(tmp_path)])

"""Import decisions logged elsewhere (e.g. a micro-randomized trial) for training and evaluation.

Format `pulsesync-decisions/1`, as CSV or JSON Lines (docs/nudges.md has the full description):

    # pulsesync-decisions/1                                         <- CSV: first line
    person,decision_time,available,options,chosen,probability,outcome_steps[,feature columns]
    p01,2015-08-03T12:15:00-07:00,1,none=0.4;walking_suggestion=0.3;break_from_sitting=0.3,none,0.4,212

    {"format": "pulsesync-decisions", "version": 1}                 <- JSON Lines: first line
    {"person": "p01", "decision_time": "2015-08-03T12:15:00-07:00", "available": true,
     "options": {"none": 0.4, "walking_suggestion": 0.3, "break_from_sitting": 0.3},
     "chosen": "none", "probability": 0.4, "outcome_steps": 212, "sedentary_min": 45}

Every row is checked and every problem reported with its line, column and what is wrong
(nothing is stored unless the whole file is valid). Rows with available = 0 are counted and
skipped: nothing was randomized there. The local minute and weekday features come from the
decision time's own UTC offset unless given. Imported people get negative ids, so they never
meet a server user, and `logged_decisions` (training.py) returns their decisions beside the
server's own.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from pulsesync.server.nudges.features import FEATURE_NAMES
from pulsesync.server.nudges.model import LoggedDecision
from pulsesync.server.storage.nudges import ImportedDecision, NudgeStorage
from pulsesync.timeutil import US_PER_S

FORMAT: Final = "pulsesync-decisions"
VERSION: Final = 1
CSV_HEADER_LINE: Final = f"# {FORMAT}/{VERSION}"
REQUIRED: Final = (
    "person",
    "decision_time",
    "available",
    "options",
    "chosen",
    "probability",
    "outcome_steps",
)
# Stop listing problems after this many: a wrong file usually repeats one mistake.
MAX_ERRORS: Final = 50
# Per-option probabilities must add up to 1 within this (they are often written rounded).
SUM_TOLERANCE: Final = 0.01


class LogFormatError(ValueError):
    """The file is not a valid decision log; `problems` lists (line, column, what is wrong)."""

    def __init__(self, problems: Sequence[tuple[int, str, str]]) -> None:
        self.problems = list(problems)
        lines = [f"line {ln}, column {col!r}: {what}" for ln, col, what in self.problems]
        super().__init__(
            f"{len(self.problems)} problem(s) in the decision log:\n" + "\n".join(lines)
        )


@dataclass(frozen=True, slots=True)
class ImportedRow:
    """One valid, available decision of the file."""

    line: int
    person: str
    decision_us: int
    features: dict[str, float]
    options: dict[str, float]
    chosen: str
    probability: float
    outcome: float


@dataclass(frozen=True, slots=True)
class ImportSummary:
    """What an import stored."""

    rows: int
    stored: int
    unavailable: int
    people: int


def _truthy(v: Any) -> bool | None:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes"):
        return True
    if s in ("0", "false", "no"):
        return False
    return None


def _options(v: Any) -> dict[str, float | None] | str:
    """name -> probability (None when only the name is given), or what is wrong."""
    out: dict[str, float | None] = {}
    if isinstance(v, Mapping):
        items: Iterable[tuple[str, Any]] = ((str(k), p) for k, p in v.items())
    elif isinstance(v, list):
        items = ((str(k), None) for k in v)
    else:
        items = (
            (part.split("=", 1)[0].strip(), part.split("=", 1)[1] if "=" in part else None)
            for part in str(v).split(";")
            if part.strip()
        )
    for name, p in items:
        if name in out:
            return f"option {name!r} is listed twice"
        if p is None:
            out[name] = None
            continue
        try:
            out[name] = float(p)
        except (TypeError, ValueError):
            return f"probability {p!r} of option {name!r} is not a number"
        if not (math.isfinite(float(p)) and 0.0 <= float(p) <= 1.0):
            return f"probability {p!r} of option {name!r} is outside [0, 1]"
    if not out:
        return "no options given"
    return out


def parse(
    records: Iterable[tuple[int, Mapping[str, Any]]], actions: Sequence[str]
) -> tuple[list[ImportedRow], int]:
    """Validate records (line, fields); the valid available rows and the unavailable count."""
    problems: list[tuple[int, str, str]] = []
    rows: list[ImportedRow] = []
    unavailable = 0
    last: dict[str, tuple[int, int]] = {}
    known = set(actions)

    def bad(line: int, col: str, what: str) -> None:
        problems.append((line, col, what))

    for line, rec in records:
        if len(problems) >= MAX_ERRORS:
            break
        missing = [c for c in REQUIRED if rec.get(c) in (None, "")]
        for c in missing:
            bad(line, c, "missing")
        if missing:
            continue
        person = str(rec["person"]).strip()
        try:
            at = datetime.fromisoformat(str(rec["decision_time"]).strip())
        except ValueError:
            bad(line, "decision_time", f"{rec['decision_time']!r} is not an ISO 8601 time")
            continue
        offset = at.utcoffset()
        if offset is None:
            bad(line, "decision_time", f"{rec['decision_time']!r} has no UTC offset (e.g. -07:00)")
            continue
        at_us = int(at.timestamp() * US_PER_S)
        if person in last and at_us <= last[person][0]:
            bad(
                line,
                "decision_time",
                f"not after person {person!r}'s previous decision (line {last[person][1]}):"
                " times must increase per person",
            )
        last[person] = (at_us, line)
        available = _truthy(rec["available"])
        if available is None:
            bad(line, "available", f"{rec['available']!r} is not 0/1 or true/false")
            continue
        if not available:
            unavailable += 1
            continue
        try:
            p = float(rec["probability"])
        except (TypeError, ValueError):
            bad(line, "probability", f"{rec['probability']!r} is not a number")
            continue
        if not (math.isfinite(p) and 0.0 < p <= 1.0):
            bad(line, "probability", f"{p!r} is outside (0, 1]")
            continue
        try:
            outcome = float(rec["outcome_steps"])
        except (TypeError, ValueError):
            bad(line, "outcome_steps", f"{rec['outcome_steps']!r} is not a number")
            continue
        if not (math.isfinite(outcome) and outcome >= 0.0):
            bad(line, "outcome_steps", f"{outcome!r} is not a finite number of steps >= 0")
            continue
        opts = _options(rec["options"])
        if isinstance(opts, str):
            bad(line, "options", opts)
            continue
        unknown = sorted(a for a in opts if a not in known)
        if unknown:
            bad(line, "options", f"unknown action(s) {unknown}; known: {sorted(known)}")
            continue
        chosen = str(rec["chosen"]).strip()
        if chosen not in opts:
            bad(line, "chosen", f"{chosen!r} is not among the options offered {sorted(opts)}")
            continue
        given = opts[chosen]
        if given is not None and abs(given - p) > 1e-6:
            bad(line, "probability", f"{p} differs from the chosen option's probability {given}")
            continue
        probs = _fill(opts, chosen, p)
        if isinstance(probs, str):
            bad(line, "options", probs)
            continue
        features: dict[str, float] = {}
        for name in FEATURE_NAMES:
            v = rec.get(name)
            if v in (None, ""):
                continue
            try:
                features[name] = float(v)
            except (TypeError, ValueError):
                bad(line, name, f"{v!r} is not a number")
        local = at.replace(tzinfo=None)
        features.setdefault("local_minute", float(local.hour * 60 + local.minute))
        features.setdefault("weekday", float(local.weekday()))
        rows.append(ImportedRow(line, person, at_us, features, probs, chosen, p, outcome))
    if problems:
        raise LogFormatError(problems)
    return rows, unavailable


def _fill(opts: Mapping[str, float | None], chosen: str, p: float) -> dict[str, float] | str:
    """Every option's probability: as given, or the rest shared equally by unlisted ones."""
    given = {a: v for a, v in opts.items() if v is not None}
    given[chosen] = p
    rest = [a for a in opts if a not in given]
    left = 1.0 - sum(given.values())
    if left < -SUM_TOLERANCE or (not rest and abs(left) > SUM_TOLERANCE):
        return f"the options' probabilities add up to {1.0 - left:.4f}, not 1"
    out = dict(given)
    for a in rest:
        out[a] = max(left, 0.0) / len(rest)
    return out


def read_records(path: Path) -> Iterable[tuple[int, Mapping[str, Any]]]:
    """(line number, fields) of a CSV or JSON Lines decision log, its version line checked."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a spreadsheet's byte-order mark is not a problem
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise LogFormatError(
            [(line, "encoding", f"byte {raw[e.start]:#04x} is not UTF-8; save the file as UTF-8")]
        ) from None
    first, _, body = text.partition("\n")
    if first.lstrip().startswith("{"):
        try:
            head = json.loads(first)
        except json.JSONDecodeError:
            head = None
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            raise LogFormatError(
                [
                    (
                        1,
                        "format",
                        f'first line must be {{"format": "{FORMAT}", "version": {VERSION}}}',
                    )
                ]
            )
        if head.get("version") != VERSION:
            raise LogFormatError(
                [
                    (
                        1,
                        "version",
                        f"version {head.get('version')!r} is not supported (only {VERSION})",
                    )
                ]
            )
        return _jsonl(body)
    if first.strip() != CSV_HEADER_LINE:
        raise LogFormatError(
            [(1, "format", f"first line must be {CSV_HEADER_LINE!r} (CSV) or a JSON format line")]
        )
    return _csv(body)


def _jsonl(body: str) -> Iterable[tuple[int, Mapping[str, Any]]]:
    out: list[tuple[int, Mapping[str, Any]]] = []
    for i, line in enumerate(body.splitlines(), start=2):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise LogFormatError([(i, "-", f"not JSON: {e.msg}")]) from None
        if not isinstance(rec, dict):
            raise LogFormatError([(i, "-", "not a JSON object")])
        out.append((i, rec))
    return out


def _csv(body: str) -> Iterable[tuple[int, Mapping[str, Any]]]:
    reader = csv.DictReader(io.StringIO(body))
    header = reader.fieldnames or []
    allowed = set(REQUIRED) | set(FEATURE_NAMES)
    problems = [(2, c, "missing column") for c in REQUIRED if c not in header]
    problems += [
        (2, c, f"unknown column; feature columns are {', '.join(FEATURE_NAMES)}")
        for c in header
        if c not in allowed
    ]
    if problems:
        raise LogFormatError(problems)
    # Line numbers: the version line is 1, the column names 2 (quoted newlines are not allowed).
    return [(i, rec) for i, rec in enumerate(reader, start=3)]


async def store(storage: NudgeStorage, source: str, rows: Sequence[ImportedRow]) -> int:
    """Store rows under source (a second import of the same file replaces it); rows stored."""
    return await storage.replace_imported(
        source,
        [
            ImportedDecision(
                r.person,
                r.decision_us,
                json.dumps(r.features),
                json.dumps(r.options),
                r.chosen,
                r.probability,
                r.outcome,
            )
            for r in rows
        ],
    )


async def import_file(storage: NudgeStorage, path: Path, actions: Sequence[str]) -> ImportSummary:
    """Validate the whole file, then store it (LogFormatError lists every problem found)."""
    records = list(read_records(path))
    rows, unavailable = parse(records, actions)
    stored = await store(storage, path.name, rows)
    return ImportSummary(len(records), stored, unavailable, len({r.person for r in rows}))


def write_jsonl(path: Path, decisions: Iterable[LoggedDecision], shift_us: int = 0) -> int:
    """Write decisions in this format (JSON Lines), times moved by shift_us; rows written.

    The inverse of `parse` for a deployment's own log (`logged_decisions`), e.g. to start
    another deployment from it: person ids become strings, times are written in UTC (the
    local minute and weekday travel as feature columns), the personal per-type histories
    (past gain, past response) are left out, as the format has no column for them.
    """
    n = 0
    with path.open("w", encoding="utf-8") as f:
        f.write(json.dumps({"format": FORMAT, "version": VERSION}) + "\n")
        for d in decisions:
            at = datetime.fromtimestamp((d.decision_us + shift_us) / US_PER_S, UTC)
            rec: dict[str, Any] = {
                "person": str(d.user_id),
                "decision_time": at.isoformat(),
                "available": True,
                "options": d.options,
                "chosen": d.chosen,
                "probability": d.probability,
                "outcome_steps": d.outcome,
            }
            rec.update({k: v for k, v in d.features.items() if k in FEATURE_NAMES})
            f.write(json.dumps(rec) + "\n")
            n += 1
    return n

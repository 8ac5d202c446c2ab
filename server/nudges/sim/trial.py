"""HeartSteps V1's decision-point figures, and the same figures computed from any randomized log.

The trial's figures come from its own decision-point file (5,801 available decision points, 37
people; sent vs not sent, steps in the 30 minutes after; 95% intervals by resampling people).
`figures` computes each row from decision points (person, daily slot 1-5, study week 1-6,
suggestion type or none, steps after); `compare` checks each row against the trial:

* a row with a trial interval: the simulated figure must lie inside it;
* a *headline* row (log-scale effect of all and of walking suggestions, mean steps after no
  suggestion): also within 30% of the trial's point estimate;
* a row the trial gives only as a point: inside point ± a half-width derived from the trial's
  own resampling widths: the half-width of the all-suggestions interval of the same measure
  (steps difference 26.9 steps, arithmetic ratio 11.65 points, log-scale effect 15.5 points)
  times sqrt(share of the decision points the row uses): x sqrt(2) for one of the two types,
  x sqrt(5) for one daily slot, x sqrt(6) for one study week (a mean over 1/k of the data has
  sqrt(k) times the spread).

The log scale is HeartSteps': log(0.5 + steps); its effect is exp(difference of means) - 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

WALK: Final = "walking_suggestion"
BREAK: Final = "break_from_sitting"
HEADLINE_TOLERANCE: Final = 0.30
# Half-widths of the trial's all-suggestions 95% intervals, per measure.
HALF_STEPS: Final = (37.1 - -16.7) / 2
HALF_RATIO: Final = (17.5 - -5.8) / 2 / 100
HALF_LOG: Final = (31.4 - 0.4) / 2 / 100


@dataclass(frozen=True, slots=True)
class Row:
    """One trial figure: its point, its interval, and whether it is a headline figure."""

    name: str
    point: float
    low: float
    high: float
    interval_from: str  # "trial" (resampling people) or how it was derived
    headline: bool = False


def _pt(name: str, point: float, half: float, share: int, headline: bool = False) -> Row:
    h = half * math.sqrt(share)
    return Row(name, point, point - h, point + h, f"trial half-width x sqrt({share})", headline)


TRIAL: Final[tuple[Row, ...]] = (
    Row("log_all", 0.145, 0.004, 0.314, "trial", headline=True),
    Row("log_walking", 0.199, 0.035, 0.397, "trial", headline=True),
    Row("log_break", 0.078, -0.129, 0.312, "trial"),
    Row("ratio_all", 0.052, -0.058, 0.175, "trial"),
    _pt("ratio_walking", 0.046, HALF_RATIO, 2),
    _pt("ratio_break", 0.060, HALF_RATIO, 2),
    Row("diff_all", 12.3, -16.7, 37.1, "trial"),
    _pt("diff_walking", 10.9, HALF_STEPS, 2),
    _pt("diff_break", 14.2, HALF_STEPS, 2),
    *(_pt(f"diff_slot{i + 1}", v, HALF_STEPS, 5) for i, v in enumerate((-16, 22, 50, 23, -3))),
    *(
        _pt(f"log_slot{i + 1}", v, HALF_LOG, 5)
        for i, v in enumerate((0.05, 0.34, 0.30, 0.08, 0.08))
    ),
    *(
        _pt(f"diff_week{i + 1}", v, HALF_STEPS, 6)
        for i, v in enumerate((107, 35, -32, -14, -17, -6))
    ),
    Row("mean_after_none", 235.0, 235.0 * 0.7, 235.0 * 1.3, "30% of the point", headline=True),
)


@dataclass(frozen=True, slots=True)
class Point:
    """One available decision point: who, daily slot (1-5), study week (1-6), what, outcome."""

    person: int
    slot: int
    week: int
    chosen: str  # "none" or the suggestion type
    steps_after: float


def _effects(points: Sequence[Point], types: Iterable[str]) -> dict[str, float]:
    kinds = set(types)
    sent = [p.steps_after for p in points if p.chosen in kinds]
    none = [p.steps_after for p in points if p.chosen == "none"]
    if not sent or not none:
        return {}
    ms, mn = sum(sent) / len(sent), sum(none) / len(none)
    ls = sum(math.log(0.5 + y) for y in sent) / len(sent)
    ln = sum(math.log(0.5 + y) for y in none) / len(none)
    return {
        "log": math.exp(ls - ln) - 1.0,
        "ratio": ms / mn - 1.0 if mn else math.nan,
        "diff": ms - mn,
    }


def figures(points: Sequence[Point]) -> dict[str, float]:
    """Every TRIAL row's figure computed from these decision points (nan when undefined)."""
    out: dict[str, float] = {}
    for label, types in (("all", (WALK, BREAK)), ("walking", (WALK,)), ("break", (BREAK,))):
        for k, v in _effects(points, types).items():
            out[f"{k}_{label}"] = v
    for s in range(1, 6):
        e = _effects([p for p in points if p.slot == s], (WALK, BREAK))
        out[f"diff_slot{s}"], out[f"log_slot{s}"] = e.get("diff", math.nan), e.get("log", math.nan)
    for w in range(1, 7):
        out[f"diff_week{w}"] = _effects([p for p in points if p.week == w], (WALK, BREAK)).get(
            "diff", math.nan
        )
    none = [p.steps_after for p in points if p.chosen == "none"]
    out["mean_after_none"] = sum(none) / len(none) if none else math.nan
    return out


@dataclass(frozen=True, slots=True)
class Check:
    """One row: the trial's figure, the simulated one, and whether it passes."""

    row: Row
    simulated: float
    ok: bool


def compare(simulated: dict[str, float]) -> list[Check]:
    """Each TRIAL row against the simulated figures (a missing or nan figure fails)."""
    out = []
    for row in TRIAL:
        v = simulated.get(row.name, math.nan)
        ok = math.isfinite(v) and row.low <= v <= row.high
        if row.headline:
            ok = ok and abs(v - row.point) <= HEADLINE_TOLERANCE * abs(row.point)
        out.append(Check(row, v, ok))
    return out


def table(checks: Sequence[Check]) -> str:
    """A markdown table: trial vs simulator, row by row."""
    lines = ["| figure | trial | accepted range | simulator | ok |", "|---|---|---|---|---|"]
    for c in checks:
        r = c.row
        pct = r.name.startswith(("log", "ratio"))

        def f(x: float, pct: bool = pct) -> str:
            return f"{x * 100:+.1f}%" if pct else f"{x:+.1f}"

        rng = f"[{f(r.low)}, {f(r.high)}] ({r.interval_from}{', headline: ±30%' if r.headline else ''})"
        lines.append(
            f"| {r.name} | {f(r.point)} | {rng} | {f(c.simulated)} | {'yes' if c.ok else 'NO'} |"
        )
    return "\n".join(lines)

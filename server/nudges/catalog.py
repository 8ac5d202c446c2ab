"""The nudge catalog: types, their limits and the policy settings, from a TOML file.

The defaults ship as `catalog.toml` beside this module; `NudgeConfig.catalog` (the `--catalog`
flag or `PULSESYNC_NUDGE_CATALOG`, read by the one configuration loader) points at an override
whose keys replace the defaults'.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final

from pulsesync.kinds import DEVICE_KINDS
from pulsesync.server.errors import InvalidArgument
from pulsesync.timeutil import US_PER_MIN
from pulsesync.v1 import common_pb2

NONE_ACTION: Final = "none"
"""The "send nothing" option, always eligible."""

_DEVICE_KINDS: Final = DEVICE_KINDS
_CONSENTS: Final = {
    "personalization": common_pb2.CONSENT_CATEGORY_PERSONALIZATION,
    "behavior": common_pb2.CONSENT_CATEGORY_BEHAVIOR,
    "activity": common_pb2.CONSENT_CATEGORY_ACTIVITY,
}
_OUTCOMES: Final = ("steps_30m", "acted", "resumed")


@dataclass(frozen=True, slots=True)
class NudgeType:
    """One kind of suggestion and its limits."""

    name: str
    title: str
    message: str
    consent: int
    device_kinds: tuple[int, ...]
    cooldown_us: int
    daily_cap: int
    expire_us: int
    outcome: str
    activity: bool
    max_recent_steps_per_min: float | None = None
    min_sedentary_min: float | None = None
    needs_continuity_item: bool = False
    near_habitual_feature: str | None = None
    min_stress: float | None = None
    after_local_min: int | None = None


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """Decision points, exploration and the global limits."""

    schedule_min: tuple[int, ...]
    sedentary_trigger_min: int
    exploration_floor: float
    min_gain_steps: float
    daily_budget: float | None
    cold_start_send_probability: float
    min_training_decisions: int
    daily_cap: int
    global_cooldown_us: int
    default_quiet_start_min: int
    default_quiet_end_min: int
    default_time_zone: str
    active_window_us: int
    outcome_window_us: int
    outcome_grace_us: int
    # Off-policy estimates score only the decisions of this many days before a candidate's
    # training ends (0: every day): responses change over weeks, and the days a candidate is
    # scored on should be those most like the days it will decide on.
    evaluation_days: float
    # (local minute it starts at, send probability), ascending: the cold start's send
    # probability from each time to the next; before the first, cold_start_send_probability.
    cold_start_bands: tuple[tuple[int, float], ...] = ()

    def cold_start_probability(self, local_minute: float | None) -> float:
        """The cold start's send probability at a local minute of the day (None: unknown)."""
        probability = self.cold_start_send_probability
        if local_minute is None:
            return probability
        for start, band in self.cold_start_bands:
            if local_minute < start:
                break
            probability = band
        return probability


@dataclass(frozen=True, slots=True)
class Catalog:
    """The policy settings and the nudge types, in a stable order."""

    policy: PolicySettings
    types: tuple[NudgeType, ...] = field(default_factory=tuple)

    def type(self, name: str) -> NudgeType:
        """The type named name (InvalidArgument if the catalog has none)."""
        for t in self.types:
            if t.name == name:
                return t
        raise InvalidArgument(
            f"unknown nudge type {name!r}; the catalog has: "
            + ", ".join(t.name for t in self.types),
            reason="UNKNOWN_NUDGE_TYPE",
        )

    @property
    def actions(self) -> tuple[str, ...]:
        """Every action the policy knows: send-nothing first, then each type."""
        return (NONE_ACTION, *(t.name for t in self.types))


_MIN: Final = US_PER_MIN


def _hhmm(text: str) -> int:
    try:
        hh, mm = text.split(":")
        value = int(hh) * 60 + int(mm)
    except ValueError:
        raise ValueError(f"schedule time {text!r} is not HH:MM") from None
    if not 0 <= value < 1440:
        raise ValueError(f"schedule time {text!r} is outside 00:00..23:59")
    return value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _budget(value: Any) -> float | None:
    """policy.daily_budget: nudges per person-day, 0 for no budget."""
    budget = float(value)
    return None if budget == 0.0 else budget


def _bands(raw: Any) -> tuple[tuple[int, float], ...]:
    """policy.cold_start_by_local_time: a table of "HH:MM" = send probability."""
    if not isinstance(raw, dict):
        raise ValueError('policy.cold_start_by_local_time must be a table of "HH:MM" = probability')
    bands = []
    for text, value in raw.items():
        probability = float(value)
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"policy.cold_start_by_local_time[{text!r}] must be in [0, 1]")
        bands.append((_hhmm(text), probability))
    return tuple(sorted(bands))


def _type(name: str, raw: dict[str, Any]) -> NudgeType:
    kinds = tuple(_DEVICE_KINDS[d] for d in raw["devices"])
    if raw["outcome"] not in _OUTCOMES:
        raise ValueError(f"type {name}: outcome must be one of {_OUTCOMES}")
    if raw["consent"] not in _CONSENTS:
        raise ValueError(f"type {name}: consent must be one of {sorted(_CONSENTS)}")
    return NudgeType(
        name=name,
        title=str(raw["title"]),
        message=str(raw["message"]),
        consent=_CONSENTS[raw["consent"]],
        device_kinds=kinds,
        cooldown_us=int(raw["cooldown_min"]) * _MIN,
        daily_cap=int(raw["daily_cap"]),
        expire_us=int(raw["expire_min"]) * _MIN,
        outcome=str(raw["outcome"]),
        activity=bool(raw.get("activity", False)),
        max_recent_steps_per_min=raw.get("max_recent_steps_per_min"),
        min_sedentary_min=raw.get("min_sedentary_min"),
        needs_continuity_item=bool(raw.get("needs_continuity_item", False)),
        near_habitual_feature=raw.get("near_habitual_feature"),
        min_stress=raw.get("min_stress"),
        after_local_min=raw.get("after_local_min"),
    )


_POLICY_KEYS: Final = frozenset({
    "schedule", "sedentary_trigger_min", "exploration_floor", "min_gain_steps", "daily_budget",
    "cold_start_send_probability", "cold_start_by_local_time", "min_training_decisions",
    "evaluation_days",
    "daily_cap", "global_cooldown_min", "default_quiet_start_min", "default_quiet_end_min",
    "default_time_zone", "active_window_min", "outcome_window_min", "outcome_grace_min",
})  # fmt: skip


def _check_policy_keys(p: dict[str, Any]) -> None:
    """A key the policy does not read is a mistake to say, not to ignore."""
    unknown = sorted(set(p) - _POLICY_KEYS)
    if "send_budget" in unknown:
        raise ValueError(
            "policy.send_budget was replaced by policy.daily_budget (nudges per person-day; "
            "docs/nudges.md, Policy)"
        )
    if unknown:
        raise ValueError(f"unknown key(s) in the catalog's [policy]: {', '.join(unknown)}")


def parse_catalog(raw: dict[str, Any]) -> Catalog:
    """A catalog from parsed TOML (ValueError naming the bad key)."""
    try:
        p = raw["policy"]
        _check_policy_keys(p)
        policy = PolicySettings(
            schedule_min=tuple(sorted(_hhmm(s) for s in p["schedule"])),
            sedentary_trigger_min=int(p["sedentary_trigger_min"]),
            exploration_floor=float(p["exploration_floor"]),
            min_gain_steps=float(p["min_gain_steps"]),
            daily_budget=_budget(p.get("daily_budget", 0)),
            cold_start_send_probability=float(p["cold_start_send_probability"]),
            min_training_decisions=int(p["min_training_decisions"]),
            daily_cap=int(p["daily_cap"]),
            global_cooldown_us=int(p["global_cooldown_min"]) * _MIN,
            default_quiet_start_min=int(p["default_quiet_start_min"]),
            default_quiet_end_min=int(p["default_quiet_end_min"]),
            default_time_zone=str(p["default_time_zone"]),
            active_window_us=int(p["active_window_min"]) * _MIN,
            outcome_window_us=int(p["outcome_window_min"]) * _MIN,
            outcome_grace_us=int(p["outcome_grace_min"]) * _MIN,
            evaluation_days=float(p["evaluation_days"]),
            cold_start_bands=_bands(p.get("cold_start_by_local_time", {})),
        )
        types = tuple(_type(name, t) for name, t in raw["types"].items())
    except KeyError as e:
        raise ValueError(f"nudge catalog is missing the key {e.args[0]!r}") from None
    if not 0.0 <= policy.exploration_floor < 0.5:
        raise ValueError("policy.exploration_floor must be in [0, 0.5)")
    if policy.daily_budget is not None and not 0.0 < policy.daily_budget <= policy.daily_cap:
        raise ValueError("policy.daily_budget must be in (0, policy.daily_cap], or 0 for none")
    if not 0.0 <= policy.cold_start_send_probability <= 1.0:
        raise ValueError("policy.cold_start_send_probability must be in [0, 1]")
    if not (math.isfinite(policy.evaluation_days) and policy.evaluation_days >= 0.0):
        raise ValueError("policy.evaluation_days must be a number of days >= 0 (0: every day)")
    if NONE_ACTION in {t.name for t in types}:
        raise ValueError(f"{NONE_ACTION!r} is reserved for sending nothing")
    return Catalog(policy, types)


def default_catalog_text() -> str:
    """The shipped catalog.toml."""
    return resources.files("pulsesync.server.nudges").joinpath("catalog.toml").read_text("utf-8")


def load_catalog(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Catalog:
    """The default catalog, with the file at path and overrides merged in."""
    raw = tomllib.loads(default_catalog_text())
    if path:
        try:
            raw = _merge(raw, tomllib.loads(Path(path).read_text("utf-8")))
        except OSError as e:
            raise ValueError(f"cannot read nudge catalog {path}: {e}") from e
    if overrides:
        raw = _merge(raw, overrides)
    return parse_catalog(raw)

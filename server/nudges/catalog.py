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
    # A learned policy's predicted effect of a type in a quarter of the day is scaled by
    # n / (n + support_sends), n the training log's nudges of that type there (0: off): a
    # candidate does not move its sends to where the log hardly ever sent (model.py).
    support_sends: float
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


def _hhmm(text: Any) -> int:
    if not isinstance(text, str):
        raise ValueError(f"schedule time {text!r} is not HH:MM")
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


def _float(where: str, value: Any, minimum: float | None = None) -> float:
    """A TOML number (not a string or a boolean), finite and >= minimum; ValueError naming
    where it is."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where} must be a number, not {value!r}")
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise ValueError(f"{where} must be a finite number{bound}, not {value!r}")
    return float(value)


def _int(where: str, value: Any, minimum: int = 0, maximum: int | None = None) -> int:
    """A TOML whole number (30 or 30.0) in [minimum, maximum]; ValueError naming where it is."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where} must be a whole number, not {value!r}")
    if not (
        math.isfinite(value)
        and value == int(value)
        and value >= minimum
        and (maximum is None or value <= maximum)
    ):
        bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise ValueError(f"{where} must be a whole number {bound}, not {value!r}")
    return int(value)


def _budget(value: Any) -> float | None:
    """policy.daily_budget: nudges per person-day, 0 for no budget."""
    budget = _float("policy.daily_budget", value)
    return None if budget == 0.0 else budget


def _bands(raw: Any) -> tuple[tuple[int, float], ...]:
    """policy.cold_start_by_local_time: a table of "HH:MM" = send probability."""
    if not isinstance(raw, dict):
        raise ValueError('policy.cold_start_by_local_time must be a table of "HH:MM" = probability')
    bands = []
    for text, value in raw.items():
        probability = _float(f"policy.cold_start_by_local_time[{text!r}]", value)
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"policy.cold_start_by_local_time[{text!r}] must be in [0, 1]")
        bands.append((_hhmm(text), probability))
    return tuple(sorted(bands))


def _optional_float(name: str, raw: dict[str, Any], key: str) -> float | None:
    value = raw.get(key)
    return None if value is None else _float(f"type {name}: {key}", value)


def _type(name: str, raw: Any) -> NudgeType:
    if not isinstance(raw, dict):
        raise ValueError(f"type {name} must be a table of settings ([types.{name}])")
    devices = raw["devices"]
    if not isinstance(devices, list) or not devices:
        raise ValueError(f"type {name}: devices must be a non-empty list of device kinds")
    unknown = [d for d in devices if not isinstance(d, str) or d not in _DEVICE_KINDS]
    if unknown:
        raise ValueError(
            f"type {name}: unknown device kind(s) {unknown}; one of {sorted(_DEVICE_KINDS)}"
        )
    if raw["outcome"] not in _OUTCOMES:
        raise ValueError(f"type {name}: outcome must be one of {_OUTCOMES}")
    if not isinstance(raw["consent"], str) or raw["consent"] not in _CONSENTS:
        raise ValueError(f"type {name}: consent must be one of {sorted(_CONSENTS)}")
    habitual = raw.get("near_habitual_feature")
    if habitual is not None and not isinstance(habitual, str):
        raise ValueError(f"type {name}: near_habitual_feature must be a string")
    after = raw.get("after_local_min")
    return NudgeType(
        name=name,
        title=str(raw["title"]),
        message=str(raw["message"]),
        consent=_CONSENTS[raw["consent"]],
        device_kinds=tuple(_DEVICE_KINDS[d] for d in devices),
        cooldown_us=_int(f"type {name}: cooldown_min", raw["cooldown_min"]) * _MIN,
        daily_cap=_int(f"type {name}: daily_cap", raw["daily_cap"]),
        expire_us=_int(f"type {name}: expire_min", raw["expire_min"], minimum=1) * _MIN,
        outcome=str(raw["outcome"]),
        activity=bool(raw.get("activity", False)),
        max_recent_steps_per_min=_optional_float(name, raw, "max_recent_steps_per_min"),
        min_sedentary_min=_optional_float(name, raw, "min_sedentary_min"),
        needs_continuity_item=bool(raw.get("needs_continuity_item", False)),
        near_habitual_feature=habitual,
        min_stress=_optional_float(name, raw, "min_stress"),
        after_local_min=None
        if after is None
        else _int(f"type {name}: after_local_min", after, maximum=1439),
    )


_POLICY_KEYS: Final = frozenset({
    "schedule", "sedentary_trigger_min", "exploration_floor", "min_gain_steps", "daily_budget",
    "cold_start_send_probability", "cold_start_by_local_time", "min_training_decisions",
    "evaluation_days", "support_sends",
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

        def number(key: str, minimum: float | None = None) -> float:
            return _float(f"policy.{key}", p[key], minimum)

        def whole(key: str, minimum: int = 0, maximum: int | None = None) -> int:
            return _int(f"policy.{key}", p[key], minimum, maximum)

        policy = PolicySettings(
            schedule_min=tuple(sorted(_hhmm(s) for s in p["schedule"])),
            sedentary_trigger_min=whole("sedentary_trigger_min", minimum=1),
            exploration_floor=number("exploration_floor"),
            min_gain_steps=number("min_gain_steps"),
            daily_budget=_budget(p.get("daily_budget", 0)),
            cold_start_send_probability=number("cold_start_send_probability"),
            min_training_decisions=whole("min_training_decisions", minimum=1),
            daily_cap=whole("daily_cap"),
            global_cooldown_us=whole("global_cooldown_min") * _MIN,
            default_quiet_start_min=whole("default_quiet_start_min", maximum=1439),
            default_quiet_end_min=whole("default_quiet_end_min", maximum=1439),
            default_time_zone=str(p["default_time_zone"]),
            active_window_us=whole("active_window_min", minimum=1) * _MIN,
            outcome_window_us=whole("outcome_window_min", minimum=1) * _MIN,
            outcome_grace_us=whole("outcome_grace_min") * _MIN,
            evaluation_days=number("evaluation_days", minimum=0.0),
            support_sends=number("support_sends", minimum=0.0),
            cold_start_bands=_bands(p.get("cold_start_by_local_time", {})),
        )
        types = tuple(_type(name, t) for name, t in raw["types"].items())
    except KeyError as e:
        raise ValueError(f"missing the key {e.args[0]!r}") from None
    if not 0.0 <= policy.exploration_floor < 0.5:
        raise ValueError("policy.exploration_floor must be in [0, 0.5)")
    if policy.daily_budget is not None and not 0.0 < policy.daily_budget <= policy.daily_cap:
        raise ValueError("policy.daily_budget must be in (0, policy.daily_cap], or 0 for none")
    if not 0.0 <= policy.cold_start_send_probability <= 1.0:
        raise ValueError("policy.cold_start_send_probability must be in [0, 1]")
    if NONE_ACTION in {t.name for t in types}:
        raise ValueError(f"{NONE_ACTION!r} is reserved for sending nothing")
    return Catalog(policy, types)


class CatalogError(ValueError):
    """The catalog cannot be used: unreadable, not TOML, or a bad key or value (the message
    names the file and the problem)."""


def default_catalog_text() -> str:
    """The shipped catalog.toml."""
    return resources.files("pulsesync.server.nudges").joinpath("catalog.toml").read_text("utf-8")


def load_catalog(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Catalog:
    """The default catalog, with the file at path and overrides merged in.

    CatalogError says which file and what is wrong (unreadable, not TOML, a bad key or value).
    """
    raw = tomllib.loads(default_catalog_text())
    where = f"nudge catalog {path}" if path else "nudge catalog"
    if path:
        try:
            text = Path(path).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise CatalogError(f"cannot read {where}: {reason}") from None
        try:
            raw = _merge(raw, tomllib.loads(text))
        except tomllib.TOMLDecodeError as e:
            raise CatalogError(f"{where} is not valid TOML: {e}") from None
    if overrides:
        raw = _merge(raw, overrides)
    try:
        return parse_catalog(raw)
    except ValueError as e:
        raise CatalogError(f"{where}: {e}") from None

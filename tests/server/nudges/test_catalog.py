"""The catalog's values: TOML numbers where numbers are meant, refused naming the key otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pulsesync.server.cli import main as cli_main
from pulsesync.server.nudges.catalog import load_catalog
from pulsesync.timeutil import US_PER_MIN

WALK = "walking_suggestion"


def test_the_shipped_catalog_parses_with_its_documented_values() -> None:
    catalog = load_catalog()
    assert catalog.policy.schedule_min == (510, 735, 930, 1080, 1230)
    assert catalog.policy.global_cooldown_us == 60 * US_PER_MIN
    walk = catalog.type(WALK)
    assert walk.cooldown_us == 120 * US_PER_MIN
    assert walk.max_recent_steps_per_min == 60.0


def test_a_whole_number_written_as_a_float_is_taken() -> None:
    policy = load_catalog(overrides={"policy": {"global_cooldown_min": 45.0}}).policy
    assert policy.global_cooldown_us == 45 * US_PER_MIN


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"policy": {"exploration_floor": "0.05"}}, "policy.exploration_floor must be a number, not '0.05'"),
        ({"policy": {"min_gain_steps": True}}, "policy.min_gain_steps must be a number, not True"),
        ({"policy": {"daily_budget": "two"}}, "policy.daily_budget must be a number, not 'two'"),
        ({"policy": {"global_cooldown_min": 7.5}}, r"policy.global_cooldown_min must be a whole number >= 0, not 7.5"),
        ({"policy": {"daily_cap": -1}}, r"policy.daily_cap must be a whole number >= 0, not -1"),
        ({"policy": {"min_training_decisions": 0}}, "policy.min_training_decisions must be a whole number >= 1"),
        ({"policy": {"default_quiet_start_min": 1440}}, r"policy.default_quiet_start_min must be a whole number in 0..1439"),
        ({"policy": {"outcome_window_min": [30]}}, r"policy.outcome_window_min must be a whole number, not \[30\]"),
        ({"policy": {"evaluation_days": float("nan")}}, "policy.evaluation_days must be a finite number >= 0"),
        ({"policy": {"support_sends": -1}}, "policy.support_sends must be a finite number >= 0"),
        ({"policy": {"cold_start_by_local_time": {"12:00": "half"}}}, r"policy.cold_start_by_local_time\['12:00'\] must be a number"),
        ({"types": {WALK: {"cooldown_min": "2h"}}}, f"type {WALK}: cooldown_min must be a whole number, not '2h'"),
        ({"types": {WALK: {"expire_min": 0}}}, f"type {WALK}: expire_min must be a whole number >= 1"),
        ({"types": {WALK: {"max_recent_steps_per_min": "sixty"}}}, f"type {WALK}: max_recent_steps_per_min must be a number"),
        ({"types": {WALK: {"after_local_min": 1500}}}, f"type {WALK}: after_local_min must be a whole number in 0..1439"),
        ({"types": {WALK: {"near_habitual_feature": 3}}}, f"type {WALK}: near_habitual_feature must be a string"),
        ({"types": {WALK: {"devices": ["phone", "toaster"]}}}, rf"type {WALK}: unknown device kind\(s\) \['toaster'\]"),
        ({"types": {WALK: {"devices": "phone"}}}, f"type {WALK}: devices must be a non-empty list"),
        ({"types": {WALK: {"devices": [{"kind": "phone"}]}}}, rf"type {WALK}: unknown device kind\(s\)"),
        ({"types": {WALK: {"consent": {"x": 1}}}}, f"type {WALK}: consent must be one of"),
        ({"policy": {"schedule": ["08:30", 900]}}, "schedule time 900 is not HH:MM"),
        ({"types": {"stretch": 3}}, r"type stretch must be a table of settings \(\[types.stretch\]\)"),
    ],
)  # fmt: skip
def test_a_bad_value_is_refused_naming_its_key(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_catalog(overrides=overrides)


def test_a_missing_key_is_named(tmp_path: Path) -> None:
    # A new type must carry every required key; the first one missing is named.
    path = tmp_path / "catalog.toml"
    path.write_text('[types.stretch]\ntitle = "Stretch"\nmessage = "now"\n', "utf-8")
    with pytest.raises(ValueError, match=f"nudge catalog {path}: missing the key 'devices'"):
        load_catalog(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[types.walking_suggestion]\ncooldown_min = "2h"\n', "type walking_suggestion: cooldown_min must be a whole number, not '2h'"),
        ("schedule = [", "is not valid TOML"),
        (None, "cannot read nudge catalog .*: No such file or directory"),
    ],
)  # fmt: skip
def test_the_nudge_commands_say_what_is_wrong_with_a_catalog_in_one_line(
    tmp_path: Path, text: str | None, message: str
) -> None:
    path = tmp_path / "catalog.toml"
    if text is not None:
        path.write_text(text, "utf-8")
    with pytest.raises(SystemExit, match=message):
        cli_main(["nudges", "evaluate", "--catalog", str(path), "--data-dir", str(tmp_path)])


def test_the_server_refuses_a_bad_catalog_before_it_starts(tmp_path: Path) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text("[policy]\ndaily_cap = 2.5\n", "utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "pulsesync.server.cli", "serve", "--data-dir", str(tmp_path / "data"), "--port", "0"],
        env={**os.environ, "PULSESYNC_NUDGE_CATALOG": str(path)},
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert (
        f"nudge catalog {path}: policy.daily_cap must be a whole number >= 0, not 2.5"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr

"""The server's settings: values a parser accepts but the server cannot use are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from pulsesync.server.cli import main as cli_main
from pulsesync.server.config import load_config


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"port": 99999}, r"the port must be in 0\.\.65535 \(0: any free one\), not 99999"),
        ({"port": -5}, "the port must be in 0..65535 .*, not -5"),
        ({"metrics_port": 70000}, "the metrics port must be in 0..65535 .*, not 70000"),
        ({"nudges.tick_seconds": 0.0}, "the nudge tick must be a positive number of seconds, not 0"),
        ({"nudges.tick_seconds": float("nan")}, "the nudge tick must be a positive number of seconds, not nan"),
    ],
)  # fmt: skip
def test_an_unusable_value_is_refused_naming_the_setting(
    flags: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(flags)


def test_the_bounds_themselves_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config({"port": 0}).port == 0
    monkeypatch.setenv("PULSESYNC_PORT", "65535")
    assert load_config().port == 65535


def test_serve_says_so_in_one_line_before_binding_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Port 99999 was bound as some free port, silently.
    with pytest.raises(SystemExit, match=r"the port must be in 0\.\.65535"):
        cli_main(["serve", "--port", "99999", "--data-dir", str(tmp_path)])
    monkeypatch.setenv("PULSESYNC_NUDGE_TICK_SECONDS", "0")
    with pytest.raises(SystemExit, match="the nudge tick must be a positive number"):
        cli_main(["serve", "--port", "0", "--data-dir", str(tmp_path)])

"""`pulsesync demo` refuses what it cannot play before it starts, in one line on stderr."""

from __future__ import annotations

from pathlib import Path

import pytest

from pulsesync.server.cli import main


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--wall-seconds", "nan"], "--wall-seconds must be at least 5"),
        (["--hours", "inf"], "--hours must be in (0, 72]"),
        (["--start-hour", "24"], "--start-hour must be in [0, 24)"),
        (["--nudge-catalog", "CATALOG"], "nudge catalog CATALOG: policy.daily_cap must be a whole number"),
    ],
)  # fmt: skip
def test_bad_options_are_refused_before_anything_runs(
    tmp_path: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text("[policy]\ndaily_cap = 2.5\n", "utf-8")
    out = tmp_path / "demo"
    flags = [str(catalog) if f == "CATALOG" else f for f in flags]
    assert main(["demo", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message.replace("CATALOG", str(catalog)) in err
    assert not out.exists()

"""A shortened `pulsesync demo`: the report exists, every section has data, and it renders."""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from pulsesync.server.demo.cli import play
from pulsesync.server.demo.world import DemoOptions, DemoResult

SECTIONS = ("timeline", "nudges", "policy", "continuity", "privacy", "log")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    out = tmp_path_factory.mktemp("demo")
    # Cold start sends at every eligible decision point, so the short run surely has nudges.
    catalog = out / "catalog.toml"
    catalog.write_text("[policy]\ncold_start_send_probability = 1.0\n")
    options = DemoOptions(
        start_hour=9.5, hours=3.0, wall_seconds=12.0, out_dir=out, nudge_catalog=catalog
    )
    with (out / "console.txt").open("w") as f:
        return asyncio.run(play(options, Console(file=f, width=120)))


def _section(html: str, name: str) -> str:
    match = re.search(rf'<section id="{name}">(.*?)</section>', html, re.S)
    assert match, f"section {name} missing"
    return match.group(1)


@pytest.mark.slow
def test_report_has_every_section_with_data(demo: DemoResult) -> None:
    assert demo.report is not None
    html = demo.report.read_text()
    for name in SECTIONS:
        assert _section(html, name).strip()

    person = demo.people[0]
    devices = {person.device_names[e.device_id] for e in person.timeline}
    assert devices == {"desktop", "phone", "wearable"} or devices == {"desktop", "wearable"}
    assert any(e.event.HasField("heart_rate") for e in person.timeline)
    assert sum(b.steps for b in person.buckets) > 0, "the persona walks at lunch: steps expected"
    timeline = _section(html, "timeline")
    image = re.search(r'src="data:image/png;base64,([^"]+)"', timeline)
    assert image
    assert base64.b64decode(image.group(1))[:8] == b"\x89PNG\r\n\x1a\n"

    assert person.nudge_records, "cold start at p=1 must have sent nudges"
    nudges = _section(html, "nudges")
    for record in person.nudge_records:
        assert record.nudge.nudge_type in nudges
    assert all(0 < r.nudge.probability <= 1 for r in person.nudge_records)
    shown = [h for h in demo.happenings if h.what == "outcome"]
    assert shown, "outcomes measured during the run are announced as they complete"
    assert all("measured from the timeline" in h.text for h in shown)
    assert "nudges sent" in _section(html, "policy")

    assert person.profile_latency_ms is not None
    assert "ms" in _section(html, "continuity")
    assert person.consent_withdrawn_us is not None
    privacy = _section(html, "privacy")
    assert "manifest.json" in privacy
    assert person.receipt is not None
    assert sum(person.receipt.deleted_counts.values()) >= len(person.timeline)
    assert person.erased_token_refused
    assert "refused (UNAUTHENTICATED)" in privacy


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_report_renders_in_headless_chromium(demo: DemoResult, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (CI installs Debian's chromium package)")
    assert demo.report is not None
    shot = tmp_path / "report.png"
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
    ]  # fmt: skip
    url = demo.report.resolve().as_uri()
    done = subprocess.run(
        [browser, *flags, "--window-size=1280,2000", f"--screenshot={shot}", url],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 50_000, "a blank page compresses to a few kilobytes"
    assert "Uncaught" not in done.stderr
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=90
    ).stdout
    for name in SECTIONS:
        assert f'id="{name}"' in dom
    assert "merged timeline" in dom

"""What the demo world is made of: its options, the people and devices it runs, what it saw.

Plain data, filled in by the set-up, the day and the collection (see world.py) and read by the
report.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from pulsesync.edge_agent.agent import Agent
from pulsesync.edge_agent.client import Credentials
from pulsesync.edge_agent.consent_sync import SyncedConsent
from pulsesync.edge_agent.profiles import ProfileSync
from pulsesync.server.demo.persona import Persona
from pulsesync.v1 import (
    events_pb2,
    nudges_pb2,
    privacy_pb2,
    timeline_pb2,
)

NAMES: Final = ("ada", "grace", "alan", "edsger", "barbara", "donald", "frances", "ken")
# The wearable's sensors notify once per this many simulated seconds: a real strap sends
# every second, which at a thousandfold speed-up would only burn the demo's CPU. It stays
# under the bridge's MAX_CADENCE_GAP_S, beyond which no steps are integrated from cadence.
SENSOR_TICK_S: Final = 4.0
# Real seconds between the server's nudge decision ticks (a few simulated minutes at the
# default speed, so scheduled decision points land close to their time).
NUDGE_TICK_S: Final = 0.25
# How long the end of the period waits for the server to measure the outcomes due in it.
OUTCOME_WAIT_S: Final = 60.0
# Where in the simulated period the scripted moments happen (fractions of it).
PROFILE_EDIT_AT: Final = 0.72
CONSENT_WITHDRAW_AT: Final = 0.88

Say = Callable[[int, str, str], None]


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What to simulate and how fast."""

    users: int = 1
    start_hour: float = 6.0  # local (UTC) time of day the simulated period starts
    hours: float = 18.0
    wall_seconds: float = 90.0
    out_dir: Path = Path("pulsesync-demo")
    seed: int = 7
    # A nudge catalog override for the server (same format as PULSESYNC_NUDGE_CATALOG).
    nudge_catalog: Path | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.users <= len(NAMES):
            raise ValueError(f"--users must be 1..{len(NAMES)}")
        if not 0 < self.hours <= 72:
            raise ValueError("--hours must be in (0, 72]")
        if not 0 <= self.start_hour < 24:
            raise ValueError("--start-hour must be in [0, 24)")
        if not self.wall_seconds >= 5:  # nan included
            raise ValueError("--wall-seconds must be at least 5")


@dataclass(slots=True)
class Happening:
    """Something worth showing, at a simulated time."""

    t_us: int
    user: str
    what: str  # "nudge", "feedback", "profile", "consent", "merge", "privacy"
    text: str


@dataclass(slots=True)
class DeviceRun:
    label: str
    kind: int
    creds: Credentials
    state_dir: Path
    consent: SyncedConsent
    agent: Agent = field(init=False)
    accepted: int = 0
    refused_for_consent: int = 0


@dataclass(slots=True)
class NudgeSeen:
    nudge: nudges_pb2.Nudge
    device: str
    shown_us: int
    acted: bool


@dataclass(slots=True)
class PersonRun:
    """One simulated person's devices and what the demo observed of them."""

    persona: Persona
    devices: dict[str, DeviceRun] = field(default_factory=dict)
    profiles: dict[str, ProfileSync] = field(default_factory=dict)
    nudges: list[NudgeSeen] = field(default_factory=list)
    sessions: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    profile_latency_ms: float | None = None
    consent_withdrawn_us: int | None = None
    consent_seen_on_desktop_ms: float | None = None
    dropped_on_device_after: int = 0
    refused_on_server_after: int = 0
    # Collected through the API at the end, for the report.
    timeline: list[events_pb2.TimelineEvent] = field(default_factory=list)
    buckets: list[timeline_pb2.ActivityBucket] = field(default_factory=list)
    nudge_records: list[nudges_pb2.NudgeRecord] = field(default_factory=list)
    summary: privacy_pb2.GetPrivacySummaryResponse | None = None
    export_files: dict[str, int] = field(default_factory=dict)
    receipt: privacy_pb2.DeletionReceipt | None = None
    erased_token_refused: bool = False
    device_names: dict[str, str] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    outcomes_shown: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.persona.name

    def metadata(self, label: str) -> tuple[tuple[str, str], ...]:
        return self.devices[label].creds.metadata


@dataclass(slots=True)
class DemoResult:
    options: DemoOptions
    start_us: int
    end_us: int
    people: list[PersonRun]
    happenings: list[Happening]
    wall_seconds: float
    report: Path | None = None

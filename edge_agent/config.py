"""Agent configuration: flags first, then PULSESYNC_AGENT_* environment variables, then defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pulsesync import wire
from pulsesync.argtypes import whole
from pulsesync.edge_agent import retry

# The server refuses batches above 5000 events; 500 events (~50 KB) per message is where a
# bidi stream reaches its throughput plateau (~300k events/s) while an ack still comes back
# within milliseconds.
DEFAULT_BATCH_SIZE: Final = 500
MAX_BATCH_SIZE: Final = wire.MAX_BATCH_EVENTS
# Batches in flight before the first is acked: enough to keep the pipe full while the server
# commits one batch and decodes the next, few enough that a reconnect resends little.
DEFAULT_WINDOW: Final = 4
# How long the uplink waits after being woken from idle for more events to share the batch.
# With the tracker's own linger this keeps a lone event's trip to the server near 100 ms.
DEFAULT_UPLINK_LINGER_S: Final = 0.02
# The tracker gathers events this long (or until a batch is full) before one outbox commit:
# one fsync per 50 ms instead of one per tap.
DEFAULT_TRACKER_LINGER_S: Final = 0.05
DEFAULT_TRACKER_MAX_BATCH: Final = 500
# Events held in memory while the disk is slow; beyond this new events are dropped (counted)
# rather than blocking the app or growing without bound (~100k small events is ~20 MB).
DEFAULT_TRACKER_MAX_QUEUE: Final = 100_000
# Reconnect backoff (full jitter): the first retry comes within half a second, so a server
# restart costs little; 30 s caps the wait so a device returns soon after an outage while a
# fleet of devices does not hammer a recovering server.
DEFAULT_BACKOFF_BASE_S: Final = retry.UPLINK.base_s
DEFAULT_BACKOFF_CAP_S: Final = retry.UPLINK.cap_s
# A stream that stayed up this long counts as healthy: the next failure starts backoff anew.
DEFAULT_HEALTHY_PERIOD_S: Final = 10.0
# A batch unacknowledged this long means a half-dead connection: drop it and reconnect.
DEFAULT_ACK_TIMEOUT_S: Final = 30.0
# Deadline for unary calls (pairing): generous for a slow link, short enough to report.
DEFAULT_CALL_TIMEOUT_S: Final = 10.0

STATE_DIR_ENV: Final = "PULSESYNC_AGENT_STATE_DIR"


def env(name: str, default: str | None = None) -> str | None:
    """The value of PULSESYNC_AGENT_<NAME>, or default."""
    return os.environ.get(f"PULSESYNC_AGENT_{name}", default)


def env_or(name: str, default: str) -> str:
    """The value of PULSESYNC_AGENT_<NAME>, or default."""
    return os.environ.get(f"PULSESYNC_AGENT_{name}", default)


def batch_size(text: str) -> int:
    """An argparse type: events per upload batch, 1..MAX_BATCH_SIZE."""
    return whole(text, 1, MAX_BATCH_SIZE)


def default_state_dir() -> Path:
    """$PULSESYNC_AGENT_STATE_DIR, else $XDG_STATE_HOME/pulsesync-agent, else ~/.local/state/..."""
    if v := os.environ.get(STATE_DIR_ENV):
        return Path(v)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "pulsesync-agent"


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """Tuning of the tracker and uplink; the defaults suit a phone or desktop app."""

    batch_size: int = DEFAULT_BATCH_SIZE
    window: int = DEFAULT_WINDOW
    uplink_linger_s: float = DEFAULT_UPLINK_LINGER_S
    tracker_linger_s: float = DEFAULT_TRACKER_LINGER_S
    tracker_max_batch: int = DEFAULT_TRACKER_MAX_BATCH
    tracker_max_queue: int = DEFAULT_TRACKER_MAX_QUEUE
    backoff_base_s: float = DEFAULT_BACKOFF_BASE_S
    backoff_cap_s: float = DEFAULT_BACKOFF_CAP_S
    healthy_period_s: float = DEFAULT_HEALTHY_PERIOD_S
    ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S
    call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch size must be 1..{MAX_BATCH_SIZE}, got {self.batch_size}")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        if self.backoff_base_s <= 0 or self.backoff_cap_s < self.backoff_base_s:
            raise ValueError("backoff needs 0 < base <= cap")
        if self.tracker_max_batch < 1 or self.tracker_max_queue < 1:
            raise ValueError("tracker batch and queue sizes must be positive")


@dataclass(frozen=True, slots=True)
class StatePaths:
    """Files in the agent's state directory."""

    root: Path

    @property
    def outbox(self) -> Path:
        return self.root / "outbox.db"

    @property
    def credentials(self) -> Path:
        return self.root / "credentials.json"

    @property
    def lock(self) -> Path:
        return self.root / "agent.lock"

    def ensure(self) -> None:
        """Create the directory, readable by its owner only."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

"""Moved to the shared kernel: `pulsesync.hlc` (kept as a name until every import moves)."""

from pulsesync.hlc import *  # noqa: F403

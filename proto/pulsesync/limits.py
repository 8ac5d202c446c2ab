"""The value ranges the server stores for sensor events, shared with the agents.

The server quarantines an event with a value outside them (pulsesync.server.timeline.validate);
a wearable bridge drops such a value before it sends the event, and counts it.
"""

from __future__ import annotations

from typing import Final

# A resting human heart does not go below ~25 bpm and no heart beats 300 times a minute: 0 means
# "no reading" and anything above 300 is a decoding error (the BLE field allows 65535).
MAX_BPM: Final = 300
# 3 s between beats is 20 bpm, already below any real reading; an RR of 0 is a decoding error.
MAX_RR_MS: Final = 3000.0
# Cadence beyond 1000 per minute or speed beyond 100 m/s are sensor garbage, not athletes.
MAX_CADENCE_PER_MIN: Final = 1000.0
MAX_SPEED_M_PER_S: Final = 100.0

"""Per-device clock skew, estimated from batch send times the way NTP filters its samples.

Each batch carries the device's send time; server receive time minus send time is the clock
offset *plus* the network and queueing delay, and delay only ever adds. So the smallest
recent sample is the best estimate of the offset alone.
"""

from __future__ import annotations

from collections import deque
from typing import Final

# 64 samples at the agents' batching rate span minutes: enough for one quick delivery to be
# among them, few enough that the minimum is cheap to recompute.
WINDOW_SAMPLES: Final = 64
# Older samples are dropped so that a clock the device corrected (NTP step) is followed
# within ten minutes.
WINDOW_US: Final = 10 * 60 * 1_000_000


class SkewEstimator:
    """Sliding-window minimum of (receive time - send time) per device."""

    def __init__(self) -> None:
        self._samples: dict[int, deque[tuple[int, int]]] = {}
        self._estimate: dict[int, int] = {}

    def observe(self, device_pk: int, received_us: int, sent_us: int) -> int:
        """Add a sample and return the device's offset estimate (server minus device, µs)."""
        window = self._samples.get(device_pk)
        if window is None:
            window = self._samples[device_pk] = deque(maxlen=WINDOW_SAMPLES)
        window.append((received_us, received_us - sent_us))
        horizon = received_us - WINDOW_US
        while window[0][0] < horizon:
            window.popleft()
        estimate = min(sample for _, sample in window)
        self._estimate[device_pk] = estimate
        return estimate

    def estimate(self, device_pk: int) -> int | None:
        """The latest estimate for the device, or None before its first sample."""
        return self._estimate.get(device_pk)

    def forget(self, device_pk: int) -> None:
        """Drop the device's samples (revoked or erased)."""
        self._samples.pop(device_pk, None)
        self._estimate.pop(device_pk, None)

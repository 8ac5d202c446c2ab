"""Per-device clock skew, estimated from batch send times the way NTP filters its samples.

Each batch carries the device's send time; server receive time minus send time is the clock
offset *plus* the network and queueing delay, and delay only ever adds. So the smallest
recent sample is the best estimate of the offset alone.

The minimum is not robust on its own: one sample with a send time in the future would win for
the whole window and shift every later event of the device. Two guards keep one bad value
from moving the estimate: a sample that puts the device clock more than MAX_OFFSET_US away from
the server's is implausible (the batch is refused and the sample dropped), and a sample far
below the current estimate is only adopted once CONFIRM_SAMPLES in a row agree on it (a clock
that really was stepped forward is followed after a few batches).
"""

from __future__ import annotations

from collections import deque
from typing import Final

from pulsesync.timeutil import US_PER_HOUR, US_PER_MIN

# 64 samples at the agents' batching rate span minutes: enough for one quick delivery to be
# among them, few enough that the minimum is cheap to recompute.
WINDOW_SAMPLES: Final = 64
# Older samples are dropped so that a clock the device corrected (NTP step) is followed
# within ten minutes.
WINDOW_US: Final = 10 * US_PER_MIN
# Device clocks are set by the network or NTP; one more than 12 hours away from the server (in
# UTC, so time zones play no part) is broken rather than skewed, and correcting its times by
# such an offset would place its events on the wrong day.
MAX_OFFSET_US: Final = 12 * US_PER_HOUR
# A drop of the minimum by more than this is a jump of the device clock (or a bad value), not
# a quicker delivery: delays on a working network vary by far less than a minute.
JUMP_US: Final = US_PER_MIN
# Consecutive samples that must agree on a jump before it is adopted.
CONFIRM_SAMPLES: Final = 3


class SkewEstimator:
    """Sliding-window minimum of (receive time - send time) per device."""

    def __init__(self) -> None:
        self._samples: dict[int, deque[tuple[int, int]]] = {}
        self._estimate: dict[int, int] = {}
        self._jump: dict[int, list[tuple[int, int]]] = {}

    @staticmethod
    def plausible(received_us: int, sent_us: int) -> bool:
        """Whether a send time is within MAX_OFFSET_US of the receive time."""
        return abs(received_us - sent_us) <= MAX_OFFSET_US

    def observe(self, device_pk: int, received_us: int, sent_us: int) -> int:
        """Add a sample and return the device's offset estimate (server minus device, µs).

        The caller checks `plausible` first; an implausible sample must not be observed."""
        sample = received_us - sent_us
        window = self._samples.get(device_pk)
        if window is None:
            window = self._samples[device_pk] = deque(maxlen=WINDOW_SAMPLES)
        current = self._estimate.get(device_pk)
        if current is not None and sample < current - JUMP_US:
            jump = self._jump.setdefault(device_pk, [])
            if jump and abs(sample - jump[0][1]) > JUMP_US:
                jump.clear()  # they disagree with each other: start counting again
            jump.append((received_us, sample))
            if len(jump) < CONFIRM_SAMPLES:
                return current  # unconfirmed: the estimate does not move
            window.clear()
            window.extend(jump)
            jump.clear()
        else:
            self._jump.pop(device_pk, None)
            window.append((received_us, sample))
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
        self._jump.pop(device_pk, None)

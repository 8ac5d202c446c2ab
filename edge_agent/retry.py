"""The agent's one retry policy: full-jitter exponential backoff for every reconnect loop.

Every loop that talks to something that can go away (the upload stream, the profile, consent and
nudge watches, a wearable's link in the BLE bridge) waits between attempts with the same rule:

    delay_n = uniform(0, min(cap, base * 2**n))      n = attempts since the last healthy period

Full jitter spreads a fleet of devices reconnecting after a server outage evenly over the
window instead of in synchronized waves (AWS Architecture Blog, "Exponential Backoff and
Jitter"); the cap keeps a long outage from turning into hour-long silences once it ends.
What to do about a failure (retry, pair again, stop) is decided by `errors.translate`, not here:
this module only says *how long* to wait.

    backoff = policy.backoff()             # one per loop; injectable rng and sleep for tests
    while True:
        try:
            await serve_once()
            backoff.reset()                # a healthy period starts over from the base
        except TransientError:
            await backoff.wait()

or, for a bounded number of tries:

    async for attempt in policy.attempts(max_attempts=5):
        ...                                # attempt 0 runs at once; later ones after a delay
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

# 2**32 base steps is far past any cap; stops the exponent (and the float) from growing without
# bound in a loop that has been failing for weeks.
_MAX_EXPONENT: Final = 32

Sleep = Callable[[float], Awaitable[None]]


class Random(Protocol):
    """The part of `random.Random` the policy uses (tests inject a seeded or fixed one)."""

    def uniform(self, a: float, b: float) -> float: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Base and cap (seconds) of a full-jitter exponential backoff."""

    base_s: float
    cap_s: float

    def __post_init__(self) -> None:
        if not (0 < self.base_s <= self.cap_s):
            raise ValueError(f"need 0 < base_s <= cap_s, got {self.base_s}, {self.cap_s}")

    def ceiling(self, attempt: int) -> float:
        """The upper bound of the delay before retry number `attempt` (0-based)."""
        return min(self.cap_s, self.base_s * 2.0 ** min(max(attempt, 0), _MAX_EXPONENT))

    def delay(self, attempt: int, rng: Random | None = None) -> float:
        """A full-jitter delay before retry number `attempt`: uniform in [0, ceiling]."""
        return float((rng or _RNG).uniform(0.0, self.ceiling(attempt)))

    def backoff(self, *, rng: Random | None = None, sleep: Sleep | None = None) -> Backoff:
        """A stateful backoff for one loop (its own attempt counter)."""
        return Backoff(self.base_s, self.cap_s, rng=rng, sleep=sleep)

    async def attempts(
        self,
        max_attempts: int | None = None,
        *,
        rng: Random | None = None,
        sleep: Sleep | None = None,
    ) -> AsyncIterator[int]:
        """Yield 0, 1, 2, ... waiting a jittered delay before each but the first; stops after
        `max_attempts` (None: never). The caller `break`s on success."""
        backoff = self.backoff(rng=rng, sleep=sleep)
        n = 0
        while max_attempts is None or n < max_attempts:
            if n:
                await backoff.wait()
            yield n
            n += 1


class Backoff:
    """One loop's backoff state: how many attempts failed since the last healthy period."""

    def __init__(
        self,
        base_s: float,
        cap_s: float,
        *,
        rng: Random | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        self.policy = RetryPolicy(base_s, cap_s)
        self._rng: Random = rng or random.Random()
        self._sleep: Sleep = sleep or asyncio.sleep
        self.attempts = 0

    @property
    def base_s(self) -> float:
        """The first window's upper bound."""
        return self.policy.base_s

    @property
    def cap_s(self) -> float:
        """The largest window's upper bound."""
        return self.policy.cap_s

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        return self.policy.ceiling(self.attempts)

    def next_delay(self) -> float:
        """The next delay in seconds; each call widens the window up to the cap."""
        delay = self.policy.delay(self.attempts, self._rng)
        self.attempts += 1
        return delay

    async def wait(self, at_least_s: float = 0.0) -> float:
        """Sleep the next delay, or at_least_s if longer (a server's RetryInfo), cancellably;
        return what was slept."""
        delay = max(self.next_delay(), at_least_s)
        await self._sleep(delay)
        return delay

    def reset(self) -> None:
        """Start over from the base (after a healthy period)."""
        self.attempts = 0


_RNG: Final = random.Random()

# The agent's policies, one per kind of peer. Every loop takes one of these (or a configured
# base/cap, see AgentSettings) rather than inventing its own numbers.

# The upload stream: a quick first retry covers a server restart or a network blip; 30 s caps
# the silence after a long outage (events wait safely in the outbox meanwhile).
UPLINK: Final = RetryPolicy(0.5, 30.0)
# Watch streams (profiles, consents, nudges): the same shape. They carry little, but a person
# expects a change made on another device to show up within a minute of the network returning.
WATCH: Final = RetryPolicy(0.2, 30.0)
# Writes of one small unary call (a profile push): retried a few times, then left for the next
# change or reconnect to carry.
UNARY: Final = RetryPolicy(0.2, 5.0)

# A wearable's link (the BLE bridge), by why it is down. A dropped link usually comes back at
# once (a body blocking the antenna): retry fast.
BLE_LINK_LOST: Final = RetryPolicy(0.25, 10.0)
# Not advertising (out of range, asleep): the bridge waits this long *for the next
# advertisement* and connects as soon as one arrives, so a long cap costs no reconnect latency.
BLE_NOT_FOUND: Final = RetryPolicy(2.0, 60.0)
# The adapter has no free connection slot: bleak-retry-connector itself waits 4 s; start there.
BLE_OUT_OF_SLOTS: Final = RetryPolicy(4.0, 60.0)
BLE_CONNECT_FAILED: Final = RetryPolicy(1.0, 30.0)
# Connected, but discovery or subscription failed: such failures tend to repeat (firmware
# quirks), so back off harder.
BLE_SETUP_FAILED: Final = RetryPolicy(2.0, 120.0)

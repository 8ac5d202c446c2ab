"""The retry policy (full-jitter exponential backoff) and the gRPC error translation seam."""

from __future__ import annotations

import random

import grpc
import pytest

from pulsesync.edge_agent import retry
from pulsesync.edge_agent.errors import (
    AgentError,
    PairingRequired,
    ServerUnsupported,
    TransientError,
    translate,
)
from pulsesync.edge_agent.retry import Backoff, RetryPolicy


class _Top:
    """A 'random' source that always picks the top of the window."""

    def uniform(self, a: float, b: float) -> float:
        return b


class _Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def test_ceiling_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(0.5, 30.0)
    assert [policy.ceiling(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert policy.ceiling(10_000) == 30.0  # no overflow after weeks of failures


def test_delays_are_full_jitter_within_the_window() -> None:
    backoff = Backoff(0.5, 30.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(200)]
    assert all(0.0 <= d <= 30.0 for d in delays)
    assert delays[0] <= 0.5
    # Full jitter: late delays spread over [0, cap], not bunched at the top.
    late = delays[20:]
    assert min(late) < 10.0 < max(late)
    assert len(set(late)) == len(late)


def test_reset_starts_over_from_the_base() -> None:
    backoff = Backoff(0.2, 30.0, rng=_Top())
    assert [backoff.next_delay() for _ in range(3)] == [0.2, 0.4, 0.8]
    backoff.reset()
    assert backoff.next_delay() == 0.2


async def test_wait_sleeps_the_delay_through_the_injected_sleep() -> None:
    sleeps = _Sleeps()
    backoff = retry.WATCH.backoff(rng=_Top(), sleep=sleeps)
    assert await backoff.wait() == retry.WATCH.base_s
    assert await backoff.wait() == 2 * retry.WATCH.base_s
    assert sleeps.delays == [retry.WATCH.base_s, 2 * retry.WATCH.base_s]


async def test_attempts_runs_the_first_at_once_and_waits_before_the_rest() -> None:
    sleeps = _Sleeps()
    seen = [n async for n in RetryPolicy(1.0, 4.0).attempts(4, rng=_Top(), sleep=sleeps)]
    assert seen == [0, 1, 2, 3]
    assert sleeps.delays == [1.0, 2.0, 4.0]


def test_bad_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="base_s"):
        RetryPolicy(0.0, 1.0)
    with pytest.raises(ValueError, match="base_s"):
        RetryPolicy(2.0, 1.0)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (grpc.StatusCode.UNAVAILABLE, TransientError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, TransientError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, TransientError),
        (grpc.StatusCode.INTERNAL, TransientError),
        (None, TransientError),
        (grpc.StatusCode.UNAUTHENTICATED, PairingRequired),
        (grpc.StatusCode.PERMISSION_DENIED, PairingRequired),
        (grpc.StatusCode.UNIMPLEMENTED, ServerUnsupported),
    ],
)
def test_translate_maps_each_status_to_one_agent_class(
    code: grpc.StatusCode | None, kind: type[Exception]
) -> None:
    err = translate(code, "why", server="h:1", what="profile sync")
    assert type(err) is kind
    if isinstance(err, AgentError):
        assert "h:1" in str(err)  # the message names the server and what to do
    else:
        assert err.code is code

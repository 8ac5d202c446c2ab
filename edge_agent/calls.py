"""Mutating unary calls made safe to retry: one request_id per intended call (AIP-155).

A call whose answer was lost (the connection dropped, the deadline passed, the replica died)
may or may not have taken effect on the server. Every mutating call of the agent therefore
carries a `request_id`, a UUID chosen once for the intended call and sent unchanged on each
retry of it: the server carries the call out once and answers a retry with the first answer
(the same token for PairDevice and RotateDeviceToken, the same consent record). Without it a
lost PairDevice answer would leave a paired device that nobody holds the token of.

    response = await mutate(lambda req: stub.UpdateConsent(req, ...), request, what="...")

Only failures that say nothing about the request are retried (UNAVAILABLE, DEADLINE_EXCEEDED,
RESOURCE_EXHAUSTED after the server's RetryInfo delay); a refusal (INVALID_ARGUMENT,
NOT_FOUND, UNAUTHENTICATED, ...) is raised at once, since the same request would be refused
again. The waits come from retry.py, like every other retry loop of the agent.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Final, Protocol, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pulsesync.edge_agent import retry
from pulsesync.edge_agent.retry import Random, RetryPolicy, Sleep

log = logging.getLogger(__name__)

RETRYABLE: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# Enough to ride out a dropped connection or a replica being replaced; a server that stays
# away longer is left to the caller's own loop (the next start, the next reconnect).
DEFAULT_ATTEMPTS: Final = 4
# A server's RetryInfo beyond this is not waited for inside one call: the caller gets the
# error and its own loop decides.
_MAX_RETRY_INFO_S: Final = 30.0


class HasRequestId(Protocol):
    """A request message with an AIP-155 request_id field."""

    request_id: str


M = TypeVar("M", bound=HasRequestId)
R = TypeVar("R")


def new_request_id() -> str:
    """A fresh request_id (a random UUID) for one intended call."""
    return str(uuid.uuid4())


def retryable(e: grpc.RpcError) -> bool:
    """Whether a failed mutating call may be sent again (with the same request_id)."""
    return isinstance(e, grpc.aio.AioRpcError | grpc.Call) and e.code() in RETRYABLE


def retry_after_s(e: grpc.RpcError) -> float:
    """The delay the server asked for in a google.rpc.RetryInfo detail (0 when none)."""
    status = rpc_status.from_call(e)  # type: ignore[arg-type]
    if status is None:
        return 0.0
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToTimedelta().total_seconds())
    return 0.0


async def mutate(
    invoke: Callable[[M], Awaitable[R]],
    request: M,
    *,
    what: str,
    max_attempts: int = DEFAULT_ATTEMPTS,
    policy: RetryPolicy = retry.UNARY,
    on_retry: Callable[[grpc.RpcError], object] | None = None,
    rng: Random | None = None,
    sleep: Sleep | None = None,
) -> R:
    """invoke(request), retried with backoff while the failure is retryable.

    The request gets a fresh request_id unless it has one (a caller that persists an intended
    call passes the id it kept), and every attempt sends the very same request. on_retry runs
    before each retry (e.g. to move to another server address). The last failure is raised.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    if not request.request_id:
        request.request_id = new_request_id()
    backoff = policy.backoff(rng=rng, sleep=sleep)
    attempt = 0
    while True:
        try:
            return await invoke(request)
        except grpc.RpcError as e:
            attempt += 1
            if not retryable(e) or attempt >= max_attempts:
                raise
            code = e.code().name if isinstance(e, grpc.aio.AioRpcError | grpc.Call) else "?"
            log.info("%s failed (%s); retrying with the same request_id", what, code)
            if on_retry is not None:
                on_retry(e)
            await backoff.wait(at_least_s=min(retry_after_s(e), _MAX_RETRY_INFO_S))

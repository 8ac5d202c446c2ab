"""The agent's exception tree and the one seam where gRPC errors become agent errors.

    Exception
    ├── TransientError          retry with backoff (retry.py); nothing for the person to do
    └── AgentError              stop and tell the person; the message says what to do
        ├── PairingRequired     the server refuses this device's token: pair again
        ├── ServerUnsupported   the server lacks an API the agent needs: upgrade the server
        └── OutboxError         the local outbox cannot be used
            ├── OutboxCorrupt   the file is damaged or is not an outbox: move it aside
            └── OutboxFull      the device's disk is full: free space; events are kept in memory

Loops never look at `grpc.StatusCode` themselves: they call `translate` (or `classify`) and act
on the class, so what counts as retryable is decided once, here (as httpx maps transport errors
in one place).
"""

from __future__ import annotations

import enum
from typing import Final

import grpc


class AgentError(Exception):
    """An error the person has to act on; the message says what to do."""


class PairingRequired(AgentError):
    """The server does not accept this device's token (revoked, unknown, or not paired)."""


class ServerUnsupported(AgentError):
    """The server does not implement an API the agent needs (an older server)."""


class OutboxError(AgentError):
    """The outbox file cannot be used (wrong format, newer version, unreadable)."""


class OutboxCorrupt(OutboxError):
    """The outbox file is damaged or is not an outbox; the message says how to recover."""


class OutboxFull(OutboxError):
    """The outbox cannot grow: the disk (or the file's size limit) is full."""


class TransientError(Exception):
    """A failure that passes by itself (network, server restart, overload): retry later."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class Disposition(enum.Enum):
    """What to do about a failed call."""

    RETRY = "retry"  # transient: reconnect with backoff, resend what is unacked
    PAIR_AGAIN = "pair_again"  # the token is not accepted: stop, the person must pair again
    FATAL = "fatal"  # retrying cannot help (e.g. the server lacks the API): stop and report


_PAIR_AGAIN: Final = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
_FATAL: Final = frozenset({grpc.StatusCode.UNIMPLEMENTED})


def classify(code: grpc.StatusCode | None) -> Disposition:
    """The one place that decides: retry (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED,
    connection loss, anything unexpected), pair again (UNAUTHENTICATED), or give up."""
    if code in _PAIR_AGAIN:
        return Disposition.PAIR_AGAIN
    if code in _FATAL:
        return Disposition.FATAL
    # Everything else -- the expected UNAVAILABLE/RESOURCE_EXHAUSTED/DEADLINE_EXCEEDED/ABORTED
    # and the unexpected -- is retried with capped backoff: events wait safely in the outbox,
    # so persistence costs nothing, while giving up would stop collection.
    return Disposition.RETRY


def pair_again_message(server: str, detail: str = "") -> str:
    """What to tell the person when the token is refused."""
    why = f" ({detail})" if detail else ""
    return (
        f"the server {server} no longer accepts this device's token{why}. Pair it again: "
        "ask for a code with `pulsesync devices pair-code USER` and run "
        "`pulsesync-agent pair --server HOST:PORT --code CODE --kind phone|desktop|wearable`"
    )


def translate(
    code: grpc.StatusCode | None, details: str, *, server: str, what: str
) -> AgentError | TransientError:
    """The agent's exception for a failed call to `server` doing `what` (e.g. "profile sync")."""
    name = code.name if code is not None else "connection lost"
    match classify(code):
        case Disposition.PAIR_AGAIN:
            return PairingRequired(pair_again_message(server, details))
        case Disposition.FATAL:
            return ServerUnsupported(
                f"{what} stopped: the server {server} does not support it ({details or name}); "
                "upgrade the server"
            )
        case _:
            return TransientError(f"{what}: {name} {details}".rstrip(), code)


def translate_rpc(e: grpc.RpcError, *, server: str, what: str) -> AgentError | TransientError:
    """`translate` for a raised gRPC error (grpc.aio.AioRpcError or a sync grpc.RpcError)."""
    code = e.code() if isinstance(e, grpc.aio.AioRpcError | grpc.Call) else None
    details = (e.details() if isinstance(e, grpc.aio.AioRpcError | grpc.Call) else "") or ""
    return translate(code, details, server=server, what=what)

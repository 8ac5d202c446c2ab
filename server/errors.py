"""The server's exception tree, each class carrying its gRPC status code and reason.

    PulseSyncError                 base; never raised directly
    ├── InvalidArgument            INVALID_ARGUMENT   a field of the request is wrong
    │   └── OutOfRange             OUT_OF_RANGE       a value is outside what is accepted
    ├── Unauthenticated            UNAUTHENTICATED    missing, unknown or revoked token
    ├── PermissionDenied           PERMISSION_DENIED  authenticated, but not allowed
    ├── NotFound                   NOT_FOUND          no such resource *for this user*
    ├── AlreadyExists              ALREADY_EXISTS
    ├── FailedPrecondition         FAILED_PRECONDITION the system is not in a state to do it
    ├── Aborted                    ABORTED            a concurrent change won; retry
    ├── ResourceExhausted          RESOURCE_EXHAUSTED too big or too many
    ├── Unimplemented              UNIMPLEMENTED      not built yet
    └── Unavailable                UNAVAILABLE        shutting down; retry elsewhere or later

Each error becomes a gRPC status at one seam (`pulsesync.server.rpc.base.rpc_method`), with a
`google.rpc.ErrorInfo` detail (domain "pulsesync.v1", the class's reason) so clients in any
language can branch on the reason rather than parse the message.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import ClassVar

import grpc

from pulsesync.profile_document import DocumentError

DOMAIN = "pulsesync.v1"


class PulseSyncError(Exception):
    """Base class: a message for people, a reason for programs, a status code for gRPC."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    default_reason: ClassVar[str] = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_delay_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})
        # When set, the status carries a google.rpc.RetryInfo detail: wait this long first.
        self.retry_delay_s = retry_delay_s


class InvalidArgument(PulseSyncError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class OutOfRange(InvalidArgument):
    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = "OUT_OF_RANGE"


class Unauthenticated(PulseSyncError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(PulseSyncError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class NotFound(PulseSyncError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(PulseSyncError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(PulseSyncError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(PulseSyncError):
    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class ResourceExhausted(PulseSyncError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unimplemented(PulseSyncError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "NOT_YET_AVAILABLE"


class Unavailable(PulseSyncError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


@contextmanager
def document_refusals() -> Iterator[None]:
    """Raise the shared profile document's refusal as the server's error, same reason:
    PermissionDenied for a path only the server may write, InvalidArgument otherwise."""
    try:
        yield
    except DocumentError as e:
        cls = PermissionDenied if e.denied else InvalidArgument
        raise cls(e.message, reason=e.reason) from None

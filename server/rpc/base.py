"""The rpc seam: authentication, error translation and metrics for every method.

Servicer methods are written as `async def Method(self, request, context, identity)` (or
async generators for server streams) and decorated with `@rpc_method()`. The decorator:

* resolves the caller's `Identity` from the "authorization: Bearer <token>" metadata
  (skipped for `public=True` methods such as pairing) -- the acting user never comes from the
  request body;
* turns a `PulseSyncError` into its gRPC status with a `google.rpc.ErrorInfo` detail;
* for streams (`stream=True`), sends the initial metadata `pulsesync.wire.STREAM_OPEN` once
  the caller is authenticated (a client may wait for it before writing), and registers the
  serving task so that revoking the device or erasing the user ends the stream at once with
  UNAUTHENTICATED.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from pulsesync.server.context import AppContext
from pulsesync.server.errors import DOMAIN, PulseSyncError, Unauthenticated
from pulsesync.server.identity import Identity
from pulsesync.status import error_info as error_info  # the client helper, kept importable here
from pulsesync.wire import STREAM_OPEN

log = logging.getLogger(__name__)

_BEARER = "bearer "

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class HasApp(Protocol):
    app: AppContext


def to_status(error: PulseSyncError) -> grpc.Status:
    """The gRPC status for an error, with ErrorInfo(domain, reason, metadata) attached."""
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=[detail])
    return rpc_status.to_status(status)


def bearer_token(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            if value.lower().startswith(_BEARER):
                return value[len(_BEARER) :].strip()
            break
    raise Unauthenticated(
        'missing credentials: send metadata "authorization: Bearer <device token>" '
        "(pair the device first)",
        reason="TOKEN_MISSING",
    )


async def authenticate(app: AppContext, context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
    """The identity behind the call's bearer token (Unauthenticated if none or revoked)."""
    identity = await app.identity.authenticate(bearer_token(context))
    await app.identity.touch(identity.device_pk)
    return identity


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: PulseSyncError) -> None:
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


@contextlib.asynccontextmanager
async def _seam(app: AppContext, context: Any, name: str) -> AsyncIterator[None]:
    """Map errors to statuses (a cut-off stream ends with its reason) and count the call."""
    code = "OK"
    try:
        yield
    except PulseSyncError as e:
        code = e.code.name
        await _abort(context, e)
    except asyncio.CancelledError:
        reason = app.sessions.reason_for(asyncio.current_task())
        if reason is None:
            code = "CANCELLED"
            raise
        code = reason.code.name
        await _abort(context, reason)
    finally:
        app.metrics.rpcs.labels(name, code).inc()


def _tracked(
    app: AppContext, identity: Identity | None, stream: bool
) -> contextlib.AbstractContextManager[None]:
    """While a stream is open, its task is registered so that it can be cut off."""
    if stream and identity is not None:
        return app.sessions.track(identity)
    return contextlib.nullcontext()


def _method_name(fn: Callable[..., Any]) -> str:
    return fn.__qualname__.replace("Servicer.", "Service.")


def rpc_method(*, public: bool = False, stream: bool = False) -> Callable[[Any], Any]:
    """Decorate a servicer method (see module docstring)."""

    def decorate(fn: Any) -> Any:
        name = _method_name(fn)

        if inspect.isasyncgenfunction(fn):

            @functools.wraps(fn)
            async def gen_wrapper(self: HasApp, request: Any, context: Any) -> AsyncIterator[Any]:
                async with _seam(self.app, context, name):
                    identity = None if public else await authenticate(self.app, context)
                    if stream:
                        await context.send_initial_metadata((STREAM_OPEN,))
                    with _tracked(self.app, identity, stream):
                        async for item in fn(self, request, context, identity):
                            yield item

            return gen_wrapper

        @functools.wraps(fn)
        async def wrapper(self: HasApp, request: Any, context: Any) -> Any:
            async with _seam(self.app, context, name):
                identity = None if public else await authenticate(self.app, context)
                with _tracked(self.app, identity, stream):
                    return await fn(self, request, context, identity)
            raise AssertionError("unreachable: the seam aborts the call on every error")

        return wrapper

    return decorate

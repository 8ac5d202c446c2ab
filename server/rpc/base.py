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
  UNAUTHENTICATED;
* with `idempotent=...`, carries out a call that has a request_id once (AIP-155): a retry gets
  the first answer (see `pulsesync.server.idempotency`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import grpc
from google.protobuf import any_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from pulsesync.server.context import RpcContext
from pulsesync.server.errors import (
    DOMAIN,
    InvalidArgument,
    PulseSyncError,
    Unauthenticated,
    Unimplemented,
)
from pulsesync.server.idempotency import request_id_in, request_id_of
from pulsesync.server.identity import Identity
from pulsesync.server.limits import MAX_WAIT_S, ReadRateLimited, read_cost
from pulsesync.server.storage.db import sqlite_code
from pulsesync.status import error_info as error_info  # the client helper, kept importable here
from pulsesync.wire import STREAM_OPEN

log = logging.getLogger(__name__)

_BEARER = "bearer "

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class HasRpc(Protocol):
    rpc: RpcContext


def to_status(error: PulseSyncError) -> grpc.Status:
    """The gRPC status for an error, with ErrorInfo(domain, reason, metadata) attached."""
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if error.retry_delay_s is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMicroseconds(int(error.retry_delay_s * 1_000_000))
        details.append(any_pb2.Any())
        details[-1].Pack(retry)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=details)
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


async def authenticate(rpc: RpcContext, context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
    """The identity behind the call's bearer token (Unauthenticated if none or revoked)."""
    identity = await rpc.identity.authenticate(bearer_token(context))
    await rpc.identity.touch(identity.device_pk)
    if rpc.sqlite is not None:
        rpc.sqlite.refuse_if_damaged()  # the touch may be what found the file damaged
    return identity


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: PulseSyncError) -> None:
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


@contextlib.asynccontextmanager
async def _seam(rpc: RpcContext, context: Any, name: str) -> AsyncIterator[None]:
    """Map errors to statuses (a cut-off stream ends with its reason) and count the call."""
    code = "OK"
    try:
        if rpc.sqlite is not None:
            rpc.sqlite.refuse_if_damaged()
        yield
    except PulseSyncError as e:
        code = e.code.name
        await _abort(context, e)
    except grpc.aio.AbortError:
        raise
    except asyncio.CancelledError:
        reason = rpc.sessions.reason_for(asyncio.current_task())
        if reason is None:
            code = "CANCELLED"
            raise
        code = reason.code.name
        await _abort(context, reason)
    except Exception as e:
        # A full disk, or a damaged file (reported once, in the log), has its own reason.
        if rpc.sqlite is not None:
            error = rpc.sqlite.storage_error(sqlite_code(e), str(e))
        else:
            from pulsesync.server.storage.postgres.errors import storage_error

            error = storage_error(e)
        if error is None:
            # Never Python's text in a status: the log line carries the traceback, and the
            # client gets only an id to quote that finds exactly that line.
            error = internal_error(name)
        code = error.code.name
        await _abort(context, error)
    finally:
        rpc.metrics.rpcs.labels(name, code).inc()


async def _paced(rpc: RpcContext, identity: Identity | None, request: Any) -> None:
    """Charge a heavy read to its device's row budget: wait for budget that comes soon, or
    hold the call, then refuse it (see pulsesync.server.limits)."""
    if identity is None:
        return
    try:
        wait_s = rpc.heavy_reads.reserve(identity.device_pk, read_cost(request), rpc.clock.now_us())
    except ReadRateLimited:
        await asyncio.sleep(MAX_WAIT_S)
        raise
    if wait_s > 0:
        await asyncio.sleep(wait_s)


def _tracked(
    rpc: RpcContext, identity: Identity | None, stream: bool, heavy: bool = False
) -> contextlib.ExitStack[bool | None]:
    """While a stream is open, its task is registered so that it can be cut off; a heavy
    read holds one of its device's slots (see pulsesync.server.limits)."""
    stack = contextlib.ExitStack()
    if identity is not None and heavy:
        stack.enter_context(rpc.heavy_reads.slot(identity.device_pk))
    if stream and identity is not None:
        stack.enter_context(rpc.sessions.track(identity))
    return stack


def _method_name(fn: Callable[..., Any]) -> str:
    return fn.__qualname__.replace("Servicer.", "Service.")


@dataclass(frozen=True, slots=True)
class Idempotent:
    """How a mutating method's request_id is scoped. An authenticated call is scoped by its
    device; a public method names its scope from the request (PairDevice: the pairing code)
    and the person its answer belongs to (for erasure)."""

    scope: Callable[[Any], str] | None = None
    owner: Callable[[Any, Any], Awaitable[int | None]] | None = None


@functools.cache
def _message_types(name: str) -> tuple[Any, Any]:
    """The (request, response) message classes of a method, e.g. "DeviceService.PairDevice"."""
    method = descriptor_pool.Default().FindMethodByName(f"pulsesync.v1.{name}")
    return (
        message_factory.GetMessageClass(method.input_type),
        message_factory.GetMessageClass(method.output_type),
    )


async def _idempotent_call(
    self: HasRpc,
    policy: Idempotent,
    name: str,
    request: Any,
    identity: Identity | None,
    call: Callable[[], Awaitable[Any]],
) -> Any:
    request_type, response_type = _message_types(name)
    message = request
    if isinstance(request, bytes):  # a method that takes its request as sent (UploadBatch)
        number = request_type.DESCRIPTOR.fields_by_name["request_id"].number
        if not request_id_in(request, number):
            return await call()
        try:
            message = request_type.FromString(request)
        except DecodeError:
            return await call()  # the method answers its malformed request itself
    if not request_id_of(message):
        return await call()
    if identity is not None:
        scope = f"device:{identity.device_id}"
    elif policy.scope is not None:
        scope = policy.scope(message)
    else:
        raise TypeError(f"{name}: a public idempotent method needs a scope and an owner")

    async def owner(response: Any) -> int | None:
        if identity is not None:
            return identity.user_id
        return await policy.owner(self, response) if policy.owner is not None else None

    return await self.rpc.idempotency.run(
        method=name,
        scope=scope,
        request=message,
        response_type=response_type,
        call=call,
        owner=owner,
    )


def rpc_method(
    *,
    public: bool = False,
    stream: bool = False,
    heavy: bool = False,
    idempotent: Idempotent | None = None,
) -> Callable[[Any], Any]:
    """Decorate a servicer method (see module docstring); `heavy` marks a read whose cost
    grows with the person's data, limited per device; `idempotent` a unary mutating method
    whose request has a request_id."""

    def decorate(fn: Any) -> Any:
        name = _method_name(fn)
        if (
            idempotent is not None
            and public
            and (idempotent.scope is None or idempotent.owner is None)
        ):
            raise TypeError(f"{name}: a public idempotent method needs a scope and an owner")

        if inspect.isasyncgenfunction(fn):

            @functools.wraps(fn)
            async def gen_wrapper(self: HasRpc, request: Any, context: Any) -> AsyncIterator[Any]:
                async with _seam(self.rpc, context, name):
                    identity = None if public else await authenticate(self.rpc, context)
                    if heavy:
                        await _paced(self.rpc, identity, request)
                    if stream:
                        await context.send_initial_metadata((STREAM_OPEN,))
                    with _tracked(self.rpc, identity, stream, heavy):
                        async for item in fn(self, request, context, identity):
                            yield item

            return gen_wrapper

        @functools.wraps(fn)
        async def wrapper(self: HasRpc, request: Any, context: Any) -> Any:
            async with _seam(self.rpc, context, name):
                identity = None if public else await authenticate(self.rpc, context)
                if heavy:
                    await _paced(self.rpc, identity, request)
                with _tracked(self.rpc, identity, stream, heavy):
                    if idempotent is None:
                        return await fn(self, request, context, identity)
                    return await _idempotent_call(
                        self,
                        idempotent,
                        name,
                        request,
                        identity,
                        lambda: fn(self, request, context, identity),
                    )
            raise AssertionError("unreachable: the seam aborts the call on every error")

        wrapper.idempotent = idempotent  # type: ignore[attr-defined]
        return wrapper

    return decorate


def internal_error(method: str) -> PulseSyncError:
    """Log the exception being handled under a fresh id; the INTERNAL error naming only that id."""
    error_id = uuid.uuid4().hex
    log.exception("unexpected error", extra={"error_id": error_id, "method": method})
    return PulseSyncError(
        f"internal error {error_id}; the server's log has the details under this id",
        reason="INTERNAL",
        metadata={"error_id": error_id},
    )


# -- malformed requests ------------------------------------------------------------------------
class _Malformed:
    """What a request that could not be parsed deserializes to (instead of an exception)."""


_MALFORMED: Final = _Malformed()


def malformed_error(method: str) -> InvalidArgument:
    """The error for request bytes that are not the method's request message."""
    return InvalidArgument(
        f"the request is not a valid request message of {method}; "
        "check the client's protobuf encoding",
        reason="MALFORMED_MESSAGE",
    )


def _lenient(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception:  # DecodeError, and whatever else a parser may raise on bad bytes
            return _MALFORMED

    return parse


if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


class MalformedRequestInterceptor(_ServerInterceptor):
    """Every method, health and reflection included, answers bytes that do not parse with
    INVALID_ARGUMENT / MALFORMED_MESSAGE rather than gRPC's UNKNOWN with Python's text.

    The method's request deserializer is made lenient (a parse failure yields a marker), and
    its behavior refuses the marker before the servicer sees it.
    """

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = str(handler_call_details.method)
        deserializer = _lenient(handler.request_deserializer)
        if handler.unary_unary is not None:
            return handler._replace(  # type: ignore[attr-defined,no-any-return]
                request_deserializer=deserializer,
                unary_unary=_checked_unary(handler.unary_unary, method),
            )
        if handler.unary_stream is not None:
            return handler._replace(  # type: ignore[attr-defined,no-any-return]
                request_deserializer=deserializer,
                unary_stream=_checked_unary_stream(handler.unary_stream, method),
            )
        if handler.stream_unary is not None:
            return handler._replace(  # type: ignore[attr-defined,no-any-return]
                request_deserializer=deserializer,
                stream_unary=_checked_stream(handler.stream_unary, method, gen=False),
            )
        return handler._replace(  # type: ignore[attr-defined,no-any-return]
            request_deserializer=deserializer,
            stream_stream=_checked_stream(handler.stream_stream, method, gen=True),
        )


async def _maybe_await(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


async def _refuse(context: Any, method: str) -> None:
    await _abort(context, malformed_error(method))


@contextlib.asynccontextmanager
async def _library_errors(context: Any, method: str) -> AsyncIterator[None]:
    """Handlers not written with rpc_method (the health service) get the same mapping: a
    method the library leaves unimplemented is UNIMPLEMENTED, anything else INTERNAL."""
    try:
        yield
    except (grpc.aio.AbortError, asyncio.CancelledError):
        raise
    except NotImplementedError:
        await _abort(context, Unimplemented(f"{method} is not implemented by this server"))
    except Exception:
        await _abort(context, internal_error(method))


def _checked_unary(behavior: Any, method: str) -> Any:
    async def unary(request: Any, context: Any) -> Any:
        if request is _MALFORMED:
            await _refuse(context, method)
        async with _library_errors(context, method):
            return await _maybe_await(behavior(request, context))

    return unary


def _checked_unary_stream(behavior: Any, method: str) -> Any:
    if inspect.isasyncgenfunction(behavior):

        async def gen(request: Any, context: Any) -> AsyncIterator[Any]:
            if request is _MALFORMED:
                await _refuse(context, method)
            async for item in behavior(request, context):
                yield item

        return gen

    async def writer(request: Any, context: Any) -> Any:
        if request is _MALFORMED:
            await _refuse(context, method)
        return await _maybe_await(behavior(request, context))

    return writer


def _checked_stream(behavior: Any, method: str, *, gen: bool) -> Any:
    def checked(requests: Any, context: Any) -> AsyncIterator[Any]:
        async def parsed() -> AsyncIterator[Any]:
            async for request in requests:
                if request is _MALFORMED:
                    await _refuse(context, method)
                yield request

        return parsed()

    if gen and inspect.isasyncgenfunction(behavior):

        async def stream_gen(requests: Any, context: Any) -> AsyncIterator[Any]:
            async for item in behavior(checked(requests, context), context):
                yield item

        return stream_gen

    async def stream(requests: Any, context: Any) -> Any:
        return await _maybe_await(behavior(checked(requests, context), context))

    return stream

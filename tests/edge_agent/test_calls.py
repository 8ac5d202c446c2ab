"""calls.mutate: one request_id per intended call, the same on every retry; only failures that
say nothing about the request are retried, after the server's RetryInfo when it gives one."""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from pulsesync.edge_agent.calls import mutate, retry_after_s
from pulsesync.v1 import privacy_pb2


class _Top:
    def uniform(self, a: float, b: float) -> float:
        return b


class _Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def _error(code: grpc.StatusCode, retry_s: float | None = None) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata()
    if retry_s is not None:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(retry_s)))
        )
        status = status_pb2.Status(code=code.value[0], message="busy", details=[detail])
        trailing.add("grpc-status-details-bin", status.SerializeToString())
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, "busy", None)


class _Server:
    """Fails with the given codes in turn, then answers; records each request_id it saw."""

    def __init__(self, *failures: grpc.aio.AioRpcError) -> None:
        self.failures = list(failures)
        self.ids: list[str] = []

    async def __call__(
        self, req: privacy_pb2.UpdateConsentRequest
    ) -> privacy_pb2.UpdateConsentResponse:
        self.ids.append(req.request_id)
        if self.failures:
            raise self.failures.pop(0)
        return privacy_pb2.UpdateConsentResponse()


async def test_retries_reuse_one_fresh_request_id() -> None:
    server = _Server(_error(grpc.StatusCode.UNAVAILABLE), _error(grpc.StatusCode.DEADLINE_EXCEEDED))
    sleeps, moved = _Sleeps(), list[grpc.RpcError]()
    await mutate(
        server, privacy_pb2.UpdateConsentRequest(), what="t", sleep=sleeps, rng=_Top(),
        on_retry=moved.append,
    )  # fmt: skip
    assert len(server.ids) == 3
    assert len(set(server.ids)) == 1
    uuid.UUID(server.ids[0])
    assert sleeps.delays == [0.2, 0.4]  # retry.UNARY's windows
    assert len(moved) == 2
    # Another intended call gets another id.
    again = _Server()
    await mutate(again, privacy_pb2.UpdateConsentRequest(), what="t", sleep=sleeps)
    assert again.ids[0] != server.ids[0]


async def test_a_kept_request_id_is_sent_as_it_is() -> None:
    server = _Server()
    kept = str(uuid.uuid4())
    await mutate(server, privacy_pb2.UpdateConsentRequest(request_id=kept), what="t")
    assert server.ids == [kept]


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
    ],
)
async def test_a_refusal_is_raised_at_once(code: grpc.StatusCode) -> None:
    server = _Server(_error(code))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mutate(server, privacy_pb2.UpdateConsentRequest(), what="t", sleep=_Sleeps())
    assert err.value.code() == code
    assert len(server.ids) == 1


async def test_gives_up_after_max_attempts_with_the_last_error() -> None:
    server = _Server(*[_error(grpc.StatusCode.UNAVAILABLE) for _ in range(5)])
    with pytest.raises(grpc.aio.AioRpcError):
        await mutate(
            server, privacy_pb2.UpdateConsentRequest(), what="t", max_attempts=3, sleep=_Sleeps()
        )
    assert len(server.ids) == 3


async def test_resource_exhausted_waits_at_least_the_servers_retry_info() -> None:
    busy = _error(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_s=3)
    assert retry_after_s(busy) == 3.0
    assert grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] == code_pb2.RESOURCE_EXHAUSTED
    server, sleeps = _Server(busy), _Sleeps()
    await mutate(server, privacy_pb2.UpdateConsentRequest(), what="t", sleep=sleeps, rng=_Top())
    assert sleeps.delays == [3.0]
    assert retry_after_s(_error(grpc.StatusCode.UNAVAILABLE)) == 0.0

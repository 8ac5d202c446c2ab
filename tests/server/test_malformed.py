"""Request bytes that do not parse get INVALID_ARGUMENT / MALFORMED_MESSAGE on every method;
an unexpected error is INTERNAL with an id that finds exactly one log line."""

from __future__ import annotations

import logging

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2

from pulsesync.server.app import RunningServer
from pulsesync.server.rpc.base import error_info
from pulsesync.server.rpc.timeline import TimelineServicer
from pulsesync.v1 import (
    devices_pb2,
    ingest_pb2,
    nudges_pb2,
    privacy_pb2,
    profiles_pb2,
    timeline_pb2,
)
from tests.support.server import pair_device

_FILES = [devices_pb2, ingest_pb2, nudges_pb2, privacy_pb2, profiles_pb2, timeline_pb2]
# A field 1 of wire type 7 (no such type): no message parses it.
GARBAGE = b"\x0f\xff\xff"


def all_methods() -> list[tuple[str, bool, bool]]:
    """(path, client streams, server streams) of every method the server serves."""
    out = []
    for module in [*_FILES, health_pb2]:
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                proto = descriptor_pb2.MethodDescriptorProto()
                m.CopyToProto(proto)
                out.append(
                    (
                        f"/{service.full_name}/{m.name}",
                        proto.client_streaming,
                        proto.server_streaming,
                    )
                )
    return out


async def _drain(call: object, server_stream: bool) -> None:
    if server_stream:
        async for _ in call:  # type: ignore[attr-defined]
            pass
    else:
        await call  # type: ignore[misc]


def test_every_service_is_covered() -> None:
    assert len(all_methods()) >= 20


async def test_malformed_bytes_get_malformed_message_everywhere(server: RunningServer) -> None:
    device = await pair_device(server, "ada")
    async with grpc.aio.insecure_channel(server.address) as ch:
        for path, client_stream, server_stream in all_methods():
            if client_stream:
                call: object = (ch.stream_stream if server_stream else ch.stream_unary)(
                    path, None, None
                )
                it = call(iter([GARBAGE]), metadata=device.metadata, timeout=10)  # type: ignore[operator]
            else:
                call = (ch.unary_stream if server_stream else ch.unary_unary)(path, None, None)
                it = call(GARBAGE, metadata=device.metadata, timeout=10)  # type: ignore[operator]
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _drain(it, server_stream)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, e.value.details())
            info = error_info(e.value)
            assert info is not None, path
            assert info.reason == "MALFORMED_MESSAGE", path
            assert "Error" not in (e.value.details() or ""), path


async def test_unexpected_error_is_internal_with_an_id_in_one_log_line(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    device = await pair_device(server, "ada")

    async def boom(*args: object, **kwargs: object) -> object:
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    servicer = server.servicers["pulsesync.v1.TimelineService"]
    assert isinstance(servicer, TimelineServicer)
    monkeypatch.setattr(servicer.store, "page", boom)
    req = timeline_pb2.ListEventsRequest()
    req.start_time.FromSeconds(0)
    req.end_time.FromSeconds(100)
    async with grpc.aio.insecure_channel(server.address) as ch:
        stub = ch.unary_unary(
            "/pulsesync.v1.TimelineService/ListEvents",
            request_serializer=timeline_pb2.ListEventsRequest.SerializeToString,
            response_deserializer=timeline_pb2.ListEventsResponse.FromString,
        )
        with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as e:
            await stub(req, metadata=device.metadata, timeout=10)
    assert e.value.code() == grpc.StatusCode.INTERNAL
    details = e.value.details() or ""
    assert "Overflow" not in details
    assert "SQLite" not in details
    info = error_info(e.value)
    assert info is not None
    assert info.reason == "INTERNAL"
    error_id = info.metadata["error_id"]
    assert error_id in details
    lines = [r for r in caplog.records if getattr(r, "error_id", None) == error_id]
    assert len(lines) == 1
    assert lines[0].exc_info is not None

"""Reflection answers under grpc.reflection.v1 (what newer tools ask for) as under v1alpha."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from tests.support.server import start_server


@pytest.mark.parametrize("package", ["grpc.reflection.v1", "grpc.reflection.v1alpha"])
async def test_reflection_lists_the_services(tmp_path: Path, package: str) -> None:
    async with start_server(tmp_path) as server, grpc.aio.insecure_channel(server.address) as ch:
        # The v1 and v1alpha messages are the same bytes on the wire; only the method path differs.
        info = ch.stream_stream(
            f"/{package}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        call = info(timeout=10)  # type: ignore[call-arg]
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        answer = await call.read()
        await call.write(
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="pulsesync.v1.DeviceService"
            )
        )
        described = await call.read()
        await call.done_writing()
    assert isinstance(answer, reflection_pb2.ServerReflectionResponse)
    assert isinstance(described, reflection_pb2.ServerReflectionResponse)
    names = {s.name for s in answer.list_services_response.service}
    assert {
        "pulsesync.v1.DeviceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    assert described.file_descriptor_response.file_descriptor_proto, "the proto files are served"

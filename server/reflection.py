"""Server reflection under both names clients ask for: `grpc.reflection.v1` and `v1alpha`.

grpcio-reflection implements only v1alpha; v1 is the same protocol (its messages are a copy
with the package renamed, so the bytes on the wire are identical), and newer tools (grpcurl,
Postman, buf curl) ask for v1 first. So the same servicer is served under the v1 name too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

SERVICE_NAME_V1: Final = "grpc.reflection.v1.ServerReflection"


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection of `service_names` (plus both reflection services) under v1 and v1alpha."""
    names = [*service_names, reflection.SERVICE_NAME, SERVICE_NAME_V1]
    servicer = reflection.aio.ReflectionServicer(names)  # type: ignore[attr-defined]
    reflection.enable_server_reflection(names, server)
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME_V1, handlers),)
    )

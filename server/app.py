"""Server lifetime: open storage, build the services, serve gRPC, shut down gracefully.

    async with running_server(config) as server:
        print(server.port)
        await server.wait_for_termination()

The engines and their wiring come from the composition root (`pulsesync.server.compose`);
each service is a servicer adapting its engine to gRPC. Background work (the ingest writer, the
nudge ticks, retention, ...) is started after storage is open and stopped before it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from prometheus_client import start_http_server

from pulsesync import wire
from pulsesync.server import reflection
from pulsesync.server.clock import Clock, SystemClock
from pulsesync.server.cluster import Cluster
from pulsesync.server.compose import Components, build
from pulsesync.server.config import ServerConfig
from pulsesync.server.context import RpcContext
from pulsesync.server.errors import PulseSyncError, Unauthenticated
from pulsesync.server.nudges.catalog import CatalogError
from pulsesync.server.profiles.crypto import Sealer
from pulsesync.server.rpc.base import MalformedRequestInterceptor
from pulsesync.server.rpc.devices import DeviceServicer
from pulsesync.server.rpc.ingest import IngestServicer
from pulsesync.server.rpc.ingest import add_to_server as add_ingest_service_to_server
from pulsesync.server.rpc.nudges import NudgeServicer
from pulsesync.server.rpc.privacy import PrivacyServicer
from pulsesync.server.rpc.profiles import ProfileServicer
from pulsesync.server.rpc.timeline import TimelineServicer
from pulsesync.server.storage.backend import open_storage
from pulsesync.server.storage.db import DatabaseDamaged
from pulsesync.server.storage.errors import DatabaseUnavailable
from pulsesync.v1 import (
    devices_pb2,
    devices_pb2_grpc,
    ingest_pb2,
    nudges_pb2,
    nudges_pb2_grpc,
    privacy_pb2,
    privacy_pb2_grpc,
    profiles_pb2,
    profiles_pb2_grpc,
    timeline_pb2,
    timeline_pb2_grpc,
)

log = logging.getLogger(__name__)

# (servicer built from the components, registration function, full service name)
SERVICES: list[tuple[Callable[[Components], Any], Callable[[Any, grpc.aio.Server], None], str]] = [
    (lambda c: DeviceServicer(c.rpc), devices_pb2_grpc.add_DeviceServiceServicer_to_server,
     devices_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name),
    (lambda c: IngestServicer(c.rpc, c.ingest, c.timeline), add_ingest_service_to_server,
     ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name),
    (lambda c: TimelineServicer(c.rpc, c.timeline_reads), timeline_pb2_grpc.add_TimelineServiceServicer_to_server,
     timeline_pb2.DESCRIPTOR.services_by_name["TimelineService"].full_name),
    (lambda c: ProfileServicer(c.rpc, c.profiles, c.consent), profiles_pb2_grpc.add_ProfileServiceServicer_to_server,
     profiles_pb2.DESCRIPTOR.services_by_name["ProfileService"].full_name),
    (lambda c: NudgeServicer(c.rpc, c.nudges), nudges_pb2_grpc.add_NudgeServiceServicer_to_server,
     nudges_pb2.DESCRIPTOR.services_by_name["NudgeService"].full_name),
    (lambda c: PrivacyServicer(c.rpc, c.privacy, c.consent), privacy_pb2_grpc.add_PrivacyServiceServicer_to_server,
     privacy_pb2.DESCRIPTOR.services_by_name["PrivacyService"].full_name),
]  # fmt: skip

GRPC_OPTIONS = [
    *wire.MESSAGE_SIZE_OPTIONS,
    *wire.KEEPALIVE_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


@dataclass(slots=True)
class RunningServer:
    """A started server: its bound port, its components (shared parts and engines) and
    servicers."""

    server: grpc.aio.Server
    port: int
    app: Components
    servicers: dict[str, Any]
    metrics_port: int | None

    @property
    def address(self) -> str:
        return f"{self.app.config.host}:{self.port}"

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise SystemExit("--tls-client-ca needs TLS: give --tls-cert and --tls-key too")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise SystemExit("TLS needs both --tls-cert and --tls-key")
    try:
        mode = config.tls_key.stat().st_mode
        cert = config.tls_cert.read_bytes()
        key = config.tls_key.read_bytes()
        client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    except OSError as e:
        raise SystemExit(f"cannot read TLS certificate, key or client CA: {e}") from e
    if mode & 0o077:
        # As for the key-encryption key: a private key others can read is no longer private.
        raise SystemExit(
            f"TLS key {config.tls_key} is readable by group or others (mode {mode & 0o777:o}); "
            f"run: chmod 600 {config.tls_key}"
        )
    if client_ca is None:
        return grpc.ssl_server_credentials([(key, cert)])
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=True
    )


def is_loopback(host: str) -> bool:
    """Whether host names only this machine (127.0.0.0/8, ::1, localhost)."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _check_plaintext_bind(config: ServerConfig) -> None:
    """Refuse plaintext beyond loopback unless the operator said --insecure (then warn)."""
    if is_loopback(config.host):
        return
    if not config.insecure:
        raise SystemExit(
            f"refusing to serve plaintext on {config.host}: device tokens would cross the "
            "network in the clear. Give --tls-cert and --tls-key (and --tls-client-ca to "
            "require device certificates), or --insecure if the network is trusted"
        )
    log.warning(
        "serving plaintext on a non-loopback address (--insecure): bearer tokens and data "
        "are readable on the network",
        extra={"host": config.host},
    )


@asynccontextmanager
async def running_server(
    config: ServerConfig,
    *,
    clock: Clock | None = None,
    profile_sealer: Sealer | None = None,
    cluster: Cluster | None = None,
) -> AsyncIterator[RunningServer]:
    """Start a server for config; stop it gracefully on exit. `profile_sealer` replaces the
    AES-GCM sealer for the profile benchmark's plaintext baseline only; `cluster` is the
    replicas it is one of (default: a cluster of this process alone)."""
    async with AsyncExitStack() as stack:
        try:
            storage = await stack.enter_async_context(open_storage(config.store, config.read_store))
        except (DatabaseDamaged, DatabaseUnavailable) as e:
            raise SystemExit(str(e)) from None  # a clear refusal, no traceback
        try:
            parts = await build(
                config,
                storage,
                clock or SystemClock(),
                profile_sealer=profile_sealer,
                cluster=cluster,
            )
        except CatalogError as e:
            raise SystemExit(str(e)) from None  # a clear refusal, no traceback
        rpc = parts.rpc
        stack.push_async_callback(rpc.idempotency.drain)  # before the database closes
        server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=[MalformedRequestInterceptor()])
        servicers: dict[str, Any] = {}
        for make, register, name in SERVICES:
            servicer = make(parts)
            register(servicer, server)
            servicers[name] = servicer

        health_servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            [name for *_, name in SERVICES]
            + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name],
            server,
        )

        creds = _credentials(config)
        if creds is None:
            _check_plaintext_bind(config)
            port = server.add_insecure_port(config.address)
        else:
            port = server.add_secure_port(config.address, creds)
        if port == 0:
            raise SystemExit(f"cannot listen on {config.address} (in use or not allowed)")

        for work in parts.background:
            await work.start()
            stack.push_async_callback(work.stop)

        await server.start()
        sweeper = asyncio.create_task(_cut_off_revoked(rpc), name="revocation-sweep")
        stack.push_async_callback(_cancel, sweeper)

        async def shutdown() -> None:
            await health_servicer.enter_graceful_shutdown()
            await server.stop(config.grace_seconds)

        stack.push_async_callback(shutdown)
        for name in [*servicers, ""]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

        async def not_serving() -> None:  # the database was found damaged: nothing may serve
            for name in [*servicers, ""]:
                await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

        health_updates: set[asyncio.Task[None]] = set()  # kept referenced until they ran
        if storage.db is not None:
            storage.db.on_damage(lambda: health_updates.add(asyncio.ensure_future(not_serving())))

        metrics_port: int | None = None
        if config.metrics_port is not None:
            http_server, _thread = start_http_server(
                config.metrics_port, addr=config.host, registry=rpc.metrics.registry
            )
            stack.callback(http_server.server_close)
            stack.callback(http_server.shutdown)
            metrics_port = int(http_server.server_port)

        if config.port_file is not None:
            tmp = config.port_file.with_suffix(".tmp")
            tmp.write_text(f"{port}\n")
            tmp.replace(config.port_file)
        log.info(
            "serving",
            extra={"address": f"{config.host}:{port}", "db": config.store.redacted(),
                   "tls": creds is not None, "mtls": config.tls_client_ca is not None, "metrics_port": metrics_port},
        )  # fmt: skip
        yield RunningServer(server, port, parts, servicers, metrics_port)
        log.info("shutting down", extra={"grace_seconds": config.grace_seconds})


# Revocations made through the API cut streams off at once; ones written to the database by
# another process (the admin CLI) are found by this sweep. Two seconds keeps the cost to one
# indexed query per sweep while a revoked device's stream dies about as fast as a person checks.
REVOCATION_SWEEP_SECONDS: Final = 2.0


def _cut_off_error(reason: str) -> PulseSyncError:
    """The status a stream cut off by the sweep ends with: the same as through the API."""
    if reason == "USER_ERASED":
        return Unauthenticated(
            "this person's data was erased; pair the device again to start over",
            reason="USER_ERASED",
        )
    return Unauthenticated("this device was revoked", reason="DEVICE_REVOKED")


async def _cut_off_revoked(rpc: RpcContext) -> None:
    """Close the open streams of devices revoked by another process, every few seconds."""
    while True:
        await asyncio.sleep(REVOCATION_SWEEP_SECONDS)
        try:
            cut = await rpc.identity.revoked_among(rpc.sessions.connected_devices())
            for device_pk, reason in cut.items():
                rpc.identity.forget_device(device_pk)
                if rpc.sessions.cut_off_device(device_pk, _cut_off_error(reason), local_only=True):
                    log.info(
                        "closed streams of a cut-off device",
                        extra={"device_pk": device_pk, "reason": reason},
                    )
        except Exception:
            log.exception("revocation sweep failed; retrying")


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def serve_forever(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running_server(config):
        await stop.wait()

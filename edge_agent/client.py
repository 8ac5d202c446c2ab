"""The agent's side of the wire: credentials, channels, pairing and error classification.

Every gRPC failure the agent sees is classified here, in one place, into what to do next:
retry with backoff, or stop and tell the person (pair again, upgrade the server).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import grpc

from pulsesync import wire
from pulsesync.edge_agent.calls import mutate
from pulsesync.edge_agent.config import DEFAULT_CALL_TIMEOUT_S
from pulsesync.edge_agent.errors import (  # re-exported: callers import them from here too
    AgentError,
    Disposition,
    PairingRequired,
    classify,
    pair_again_message,
)
from pulsesync.edge_agent.servers import ServerRotation, join_servers, parse_servers
from pulsesync.kinds import DEVICE_KIND_NAMES, DEVICE_KINDS
from pulsesync.v1 import common_pb2, devices_pb2, devices_pb2_grpc

__all__ = ["AgentError", "Disposition", "PairingRequired", "classify", "pair_again_message"]

KINDS: Final = DEVICE_KINDS
KIND_NAMES: Final = DEVICE_KIND_NAMES

CHANNEL_OPTIONS: Final[list[tuple[str, int | str]]] = [
    *wire.MESSAGE_SIZE_OPTIONS,
    *wire.KEEPALIVE_OPTIONS,
    # The uplink opens a fresh channel per attempt and owns the backoff; keep gRPC's own
    # reconnect backoff from stacking a second, longer wait on top of it.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # A target with several addresses (a DNS name of several replicas, `ipv4:a,b`): connect
    # to all and send each call to one that is up, instead of pick_first's one address.
    ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
]


@dataclass(frozen=True, slots=True)
class Credentials:
    """What pairing yields: the server address(es), device id and bearer token (never logged).

    `server` is one address or several, comma-separated (servers.parse_servers): the replicas
    the agent moves between when one fails."""

    server: str
    device_id: str
    token: str = field(repr=False)
    kind: int = common_pb2.DEVICE_KIND_UNSPECIFIED
    device_name: str = ""
    user_name: str = ""
    tls_root_cert: Path | None = None
    # Mutual TLS: the device's own certificate and key (PEM), for a server run with
    # `--tls-client-ca`. Paths, not contents, so a renewed certificate is picked up.
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = None

    @property
    def servers(self) -> tuple[str, ...]:
        """Every server address of this device, in the order given at pairing."""
        return parse_servers(self.server)

    def rotation(self, *, start: int | None = None) -> ServerRotation:
        """A position in the server list for one loop (see servers.ServerRotation)."""
        return ServerRotation(self.servers, start=start)

    def channel(self, server: str | None = None) -> grpc.aio.Channel:
        """A channel to server (default: the first address), with this device's TLS settings."""
        target = server or self.servers[0]
        return open_channel(target, self.tls_root_cert, self.client_identity)

    @property
    def client_identity(self) -> tuple[Path, Path] | None:
        """The (certificate, key) pair this device presents, if it has one."""
        if self.tls_client_cert is None or self.tls_client_key is None:
            return None
        return self.tls_client_cert, self.tls_client_key

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata that authenticates this device."""
        return (("authorization", f"Bearer {self.token}"),)

    def save(self, path: Path) -> None:
        """Write atomically, readable by the owner only (mode 0600)."""
        data = {
            "server": self.server,
            "device_id": self.device_id,
            "token": self.token,
            "kind": KIND_NAMES.get(self.kind, "unspecified"),
            "device_name": self.device_name,
            "user_name": self.user_name,
            "tls_root_cert": str(self.tls_root_cert) if self.tls_root_cert else None,
            "tls_client_cert": str(self.tls_client_cert) if self.tls_client_cert else None,
            "tls_client_key": str(self.tls_client_key) if self.tls_client_key else None,
        }
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Credentials:
        """Read credentials saved by `pulsesync-agent pair`."""
        try:
            data = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise PairingRequired(
                f"this agent is not paired (no {path}). Run "
                "`pulsesync-agent pair --server HOST:PORT --code CODE --kind phone|desktop|wearable`"
            ) from None
        except (OSError, ValueError) as e:
            raise AgentError(f"cannot read {path}: {e}; pair again to rewrite it") from e
        try:
            cert = data.get("tls_root_cert")
            client_cert, client_key = data.get("tls_client_cert"), data.get("tls_client_key")
            return cls(
                server=str(data["server"]),
                device_id=str(data["device_id"]),
                token=str(data["token"]),
                kind=KINDS.get(str(data.get("kind", "")), common_pb2.DEVICE_KIND_UNSPECIFIED),
                device_name=str(data.get("device_name", "")),
                user_name=str(data.get("user_name", "")),
                tls_root_cert=Path(cert) if cert else None,
                tls_client_cert=Path(client_cert) if client_cert else None,
                tls_client_key=Path(client_key) if client_key else None,
            )
        except KeyError as e:
            raise AgentError(f"{path} lacks {e}; pair again to rewrite it") from e


def open_channel(
    server: str,
    tls_root_cert: Path | bytes | None = None,
    client_identity: tuple[Path, Path] | None = None,
) -> grpc.aio.Channel:
    """A channel to server (HOST:PORT); TLS when a root certificate (PEM) is given, presenting
    client_identity (certificate, key) when the server requires mutual TLS."""
    if tls_root_cert is None:
        if client_identity is not None:
            raise AgentError(
                "a client certificate needs TLS: give the server's root certificate too"
            )
        return grpc.aio.insecure_channel(server, options=CHANNEL_OPTIONS)
    pem = (
        tls_root_cert
        if isinstance(tls_root_cert, bytes)
        else _read_pem(tls_root_cert, "TLS root certificate")
    )
    cert = key = None
    if client_identity is not None:
        cert = _read_pem(client_identity[0], "TLS client certificate")
        key = _read_private_key(client_identity[1])
    creds = grpc.ssl_channel_credentials(
        root_certificates=pem, private_key=key, certificate_chain=cert
    )
    return grpc.aio.secure_channel(server, creds, options=CHANNEL_OPTIONS)


def _read_pem(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise AgentError(f"cannot read the {what} {path}: {e}") from e


def _read_private_key(path: Path) -> bytes:
    """The client key, refused when others can read it (as the server refuses its own)."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise AgentError(f"cannot read the TLS client key {path}: {e}") from e
    if mode & 0o077:
        raise AgentError(
            f"the TLS client key {path} is readable by other users; run `chmod 600 {path}`"
        )
    return _read_pem(path, "TLS client key")


async def pair(
    server: str | Sequence[str],
    code: str,
    kind: int,
    name: str,
    *,
    tls_root_cert: Path | None = None,
    tls_client_cert: Path | None = None,
    tls_client_key: Path | None = None,
    timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
    max_attempts: int = 4,
) -> Credentials:
    """Trade a pairing code for a device token (DeviceService.PairDevice).

    server is one address or several (replicas, tried in turn). The call carries a request_id
    and is retried with it when the answer is lost, so a dropped connection after the server
    paired the device still yields its token (the code alone is used up by then)."""
    servers = parse_servers(server)
    if not servers:
        raise AgentError("give the server's address: --server HOST:PORT")
    joined = join_servers(servers)
    identity = (tls_client_cert, tls_client_key) if tls_client_cert and tls_client_key else None
    if (tls_client_cert is None) != (tls_client_key is None):
        raise AgentError("give both --tls-client-cert and --tls-client-key, or neither")
    rotation = ServerRotation(servers, start=0)

    async def invoke(req: devices_pb2.PairDeviceRequest) -> devices_pb2.PairDeviceResponse:
        async with open_channel(rotation.current, tls_root_cert, identity) as channel:
            stub = devices_pb2_grpc.DeviceServiceStub(channel)
            return await stub.PairDevice(req, timeout=timeout_s)

    request = devices_pb2.PairDeviceRequest(pairing_code=code, device_name=name, kind=kind)  # type: ignore[arg-type]
    try:
        resp = await mutate(
            invoke,
            request,
            what="pairing",
            max_attempts=max_attempts,
            on_retry=lambda _: rotation.advance(),
        )
    except grpc.aio.AioRpcError as e:
        hint = {
            grpc.StatusCode.UNAVAILABLE: f"is the server running at {joined}?",
            grpc.StatusCode.DEADLINE_EXCEEDED: f"no answer from {joined} in {timeout_s:g} s",
        }.get(e.code(), "ask for a new code with `pulsesync devices pair-code USER`")
        raise AgentError(f"pairing failed: {e.details() or e.code().name}; {hint}") from e
    return Credentials(
        server=joined,
        device_id=resp.device.device_id,
        token=resp.token,
        kind=kind,
        device_name=resp.device.name,
        user_name=resp.user_name,
        tls_root_cert=tls_root_cert,
        tls_client_cert=tls_client_cert,
        tls_client_key=tls_client_key,
    )

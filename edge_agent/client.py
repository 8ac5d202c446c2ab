"""The agent's side of the wire: credentials, channels, pairing and error classification.

Every gRPC failure the agent sees is classified here, in one place, into what to do next:
retry with backoff, or stop and tell the person (pair again, upgrade the server).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import grpc

from pulsesync.edge_agent.config import DEFAULT_CALL_TIMEOUT_S
from pulsesync.edge_agent.errors import (  # re-exported: callers import them from here too
    AgentError,
    Disposition,
    PairingRequired,
    classify,
    pair_again_message,
)
from pulsesync.v1 import common_pb2, devices_pb2, devices_pb2_grpc

__all__ = ["AgentError", "Disposition", "PairingRequired", "classify", "pair_again_message"]

KINDS: Final[dict[str, int]] = {
    "phone": common_pb2.DEVICE_KIND_PHONE,
    "desktop": common_pb2.DEVICE_KIND_DESKTOP,
    "wearable": common_pb2.DEVICE_KIND_WEARABLE_BRIDGE,
}
KIND_NAMES: Final[dict[int, str]] = {v: k for k, v in KINDS.items()}

# Same ceiling as the server: a full batch of 5000 events always fits.
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
CHANNEL_OPTIONS: Final[list[tuple[str, int]]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Ping an idle upload stream every 30 s (the server permits it) so NATs keep it open and a
    # dead peer is noticed within ~40 s.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # The uplink opens a fresh channel per attempt and owns the backoff; keep gRPC's own
    # reconnect backoff from stacking a second, longer wait on top of it.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


@dataclass(frozen=True, slots=True)
class Credentials:
    """What pairing yields: the server address, device id and bearer token (never logged)."""

    server: str
    device_id: str
    token: str = field(repr=False)
    kind: int = common_pb2.DEVICE_KIND_UNSPECIFIED
    device_name: str = ""
    user_name: str = ""
    tls_root_cert: Path | None = None

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
            return cls(
                server=str(data["server"]),
                device_id=str(data["device_id"]),
                token=str(data["token"]),
                kind=KINDS.get(str(data.get("kind", "")), common_pb2.DEVICE_KIND_UNSPECIFIED),
                device_name=str(data.get("device_name", "")),
                user_name=str(data.get("user_name", "")),
                tls_root_cert=Path(cert) if cert else None,
            )
        except KeyError as e:
            raise AgentError(f"{path} lacks {e}; pair again to rewrite it") from e


def open_channel(server: str, tls_root_cert: Path | bytes | None = None) -> grpc.aio.Channel:
    """A channel to server (HOST:PORT); TLS when a root certificate (PEM) is given."""
    if tls_root_cert is None:
        return grpc.aio.insecure_channel(server, options=CHANNEL_OPTIONS)
    pem = tls_root_cert if isinstance(tls_root_cert, bytes) else _read_cert(tls_root_cert)
    creds = grpc.ssl_channel_credentials(root_certificates=pem)
    return grpc.aio.secure_channel(server, creds, options=CHANNEL_OPTIONS)


def _read_cert(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise AgentError(f"cannot read the TLS root certificate {path}: {e}") from e


async def pair(
    server: str,
    code: str,
    kind: int,
    name: str,
    *,
    tls_root_cert: Path | None = None,
    timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
) -> Credentials:
    """Trade a pairing code for a device token (DeviceService.PairDevice)."""
    async with open_channel(server, tls_root_cert) as channel:
        stub = devices_pb2_grpc.DeviceServiceStub(channel)
        try:
            resp = await stub.PairDevice(
                devices_pb2.PairDeviceRequest(pairing_code=code, device_name=name, kind=kind),  # type: ignore[arg-type]
                timeout=timeout_s,
            )
        except grpc.aio.AioRpcError as e:
            hint = {
                grpc.StatusCode.UNAVAILABLE: f"is the server running at {server}?",
                grpc.StatusCode.DEADLINE_EXCEEDED: f"no answer from {server} in {timeout_s:g} s",
            }.get(e.code(), "ask for a new code with `pulsesync devices pair-code USER`")
            raise AgentError(f"pairing failed: {e.details() or e.code().name}; {hint}") from e
    return Credentials(
        server=server,
        device_id=resp.device.device_id,
        token=resp.token,
        kind=kind,
        device_name=resp.device.name,
        user_name=resp.user_name,
        tls_root_cert=tls_root_cert,
    )

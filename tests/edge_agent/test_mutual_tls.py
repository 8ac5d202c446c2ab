"""The agent presents its own certificate to a server that requires mutual TLS.

Certificates are made with `cryptography`; the server and the handshakes are real, on loopback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pulsesync.edge_agent.client import AgentError, Credentials, open_channel, pair
from pulsesync.server.app import running_server
from pulsesync.server.config import ServerConfig
from pulsesync.v1 import common_pb2, devices_pb2, devices_pb2_grpc
from tests.server.test_tls import Issued, _issue


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    ca = _issue("PulseSync test CA", None, ca=True)
    server: Issued = _issue("localhost", ca, san="localhost")
    device: Issued = _issue("device-1", ca)
    return {
        "ca": _write(tmp_path / "ca.pem", ca.cert, 0o644),
        "server_cert": _write(tmp_path / "server.pem", server.cert, 0o644),
        "server_key": _write(tmp_path / "server.key", server.key),
        "device_cert": _write(tmp_path / "device.pem", device.cert, 0o644),
        "device_key": _write(tmp_path / "device.key", device.key),
    }


async def test_the_agent_pairs_and_calls_with_its_client_certificate(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    config = ServerConfig(
        port=0,
        data_dir=tmp_path / "data",
        tls_cert=files["server_cert"],
        tls_key=files["server_key"],
        tls_client_ca=files["ca"],
        grace_seconds=0.5,
    )
    async with running_server(config) as server:
        user_id = await server.app.identity.add_user("ada")
        code, _ = await server.app.identity.create_pairing_code(user_id)
        address = f"localhost:{server.port}"  # the name in the server's certificate

        with pytest.raises(AgentError, match="pairing failed"):  # no certificate: refused
            await pair(
                address, code, common_pb2.DEVICE_KIND_PHONE, "phone", tls_root_cert=files["ca"]
            )

        creds = await pair(
            address,
            code,
            common_pb2.DEVICE_KIND_PHONE,
            "phone",
            tls_root_cert=files["ca"],
            tls_client_cert=files["device_cert"],
            tls_client_key=files["device_key"],
        )
        creds.save(tmp_path / "credentials.json")
        loaded = Credentials.load(tmp_path / "credentials.json")
        assert loaded.client_identity == (files["device_cert"], files["device_key"])
        async with loaded.channel() as channel:
            resp = await devices_pb2_grpc.DeviceServiceStub(channel).ListDevices(
                devices_pb2.ListDevicesRequest(), metadata=loaded.metadata, timeout=30
            )
        assert [d.device_id for d in resp.devices] == [creds.device_id]


def test_a_client_key_others_can_read_is_refused(files: dict[str, Path]) -> None:
    files["device_key"].chmod(0o644)
    with pytest.raises(AgentError, match="chmod 600"):
        open_channel("localhost:1", files["ca"], (files["device_cert"], files["device_key"]))


def test_a_client_certificate_without_tls_is_refused(files: dict[str, Path]) -> None:
    with pytest.raises(AgentError, match="needs TLS"):
        open_channel("localhost:1", None, (files["device_cert"], files["device_key"]))

"""The server as a process and a service: health, reflection, TLS, metrics, SIGTERM, CLI."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pulsesync.server.app import running_server
from pulsesync.server.cli import main as cli_main
from pulsesync.server.clock import FakeClock
from pulsesync.server.config import ServerConfig
from pulsesync.server.identity import TOKEN_CACHE_US, IdentityStore
from pulsesync.server.storage.db import Database
from pulsesync.server.storage.sqlite.identity import SqliteIdentityStorage
from pulsesync.v1 import devices_pb2, devices_pb2_grpc
from tests.support.server import pair_device, start_server


async def test_health_and_reflection(tmp_path: Path) -> None:
    async with start_server(tmp_path) as server, grpc.aio.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ["", "pulsesync.v1.IngestService", "pulsesync.v1.DeviceService"]:
            resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING

        reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = reflect.ServerReflectionInfo(timeout=5)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        answer = await call.read()
        await call.done_writing()
        names = {s.name for s in answer.list_services_response.service}
        assert {
            "pulsesync.v1.DeviceService",
            "pulsesync.v1.IngestService",
            "pulsesync.v1.TimelineService",
            "pulsesync.v1.ProfileService",
            "pulsesync.v1.NudgeService",
            "pulsesync.v1.PrivacyService",
            "grpc.health.v1.Health",
        } <= names


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)  # a private key readable by others is refused
    return cert_path, key_path


async def test_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    config = ServerConfig(port=0, data_dir=tmp_path, tls_cert=cert, tls_key=key, grace_seconds=0.2)
    async with running_server(config) as server:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        target = f"localhost:{server.port}"
        async with grpc.aio.secure_channel(target, creds) as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        # A plaintext client cannot talk to a TLS server.
        async with grpc.aio.insecure_channel(target) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )


async def test_metrics_endpoint(tmp_path: Path) -> None:
    config = ServerConfig(port=0, data_dir=tmp_path, metrics_port=0, grace_seconds=0.2)
    async with running_server(config) as server:
        await pair_device(server, "ada")
        assert server.metrics_port
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=5).read().decode()
        )
        assert "pulsesync_connected_devices" in body
        assert 'pulsesync_rpcs_total{code="OK",method="DeviceService.PairDevice"} 1.0' in body


async def test_revocation_from_another_process_applies(tmp_path: Path) -> None:
    clock = FakeClock()
    async with (
        start_server(tmp_path, clock=clock) as server,
        grpc.aio.insecure_channel(server.address) as ch,
    ):
        phone = await pair_device(server, "ada")
        stub = devices_pb2_grpc.DeviceServiceStub(ch)
        await stub.ListDevices(devices_pb2.ListDevicesRequest(), metadata=phone.metadata, timeout=5)
        # The admin CLI writes to the same database from another connection.
        async with await Database.open(server.app.db.path) as db:
            other = IdentityStore(SqliteIdentityStorage(db), clock)
            await other.revoke(await other.user_id_by_name("ada"), phone.device_id)
        clock.advance(TOKEN_CACHE_US / 1e6 + 1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListDevices(
                devices_pb2.ListDevicesRequest(), metadata=phone.metadata, timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cli_users_and_pairing_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--data-dir", str(tmp_path)]
    assert cli_main(["users", "add", "ada", *db]) == 0
    assert cli_main(["users", "add", "ada", *db]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["devices", "pair-code", "ada", *db]) == 0
    code = capsys.readouterr().out.strip()
    assert len(code) == 9
    assert code[4] == "-"
    assert cli_main(["devices", "pair-code", "nobody", *db]) == 1
    assert "no user named 'nobody'" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pulsesync.server.cli", "serve", "--port", "0",
         "--data-dir", str(tmp_path), "--port-file", str(port_file)],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        # A start on a loaded machine (a fresh interpreter importing gRPC, LightGBM and
        # friends) can take tens of seconds: wait for the port file, with a generous bound.
        deadline = time.monotonic() + 90
        while not port_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert port_file.exists(), "server did not start"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert '"message": "serving"' in err
    assert '"message": "shutting down"' in err

"""Bind and TLS rules: no silent plaintext beyond loopback, mutual TLS, private key modes.

Certificates are made here with `cryptography`; handshakes are real, on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pulsesync.server.app import is_loopback, running_server
from pulsesync.server.config import ServerConfig


@dataclass(frozen=True, slots=True)
class Issued:
    cert: bytes
    key: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _issue(name: str, issuer: Issued | None, *, ca: bool = False, san: str | None = None) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    if issuer is None:
        issuer_name, signing_key = subject, key
    else:
        issuer_name = x509.load_pem_x509_certificate(issuer.cert).subject
        loaded = serialization.load_pem_private_key(issuer.key, None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        signing_key = loaded
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False
        )
    cert = builder.sign(signing_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


@dataclass(frozen=True, slots=True)
class Pki:
    ca: Issued
    server: Issued
    client: Issued
    stranger: Issued  # signed by another CA
    dir: Path

    def files(self) -> tuple[Path, Path, Path]:
        cert, key, ca = self.dir / "server.pem", self.dir / "server.key", self.dir / "ca.pem"
        cert.write_bytes(self.server.cert)
        key.write_bytes(self.server.key)
        key.chmod(0o600)
        ca.write_bytes(self.ca.cert)
        return cert, key, ca


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = _issue("PulseSync test CA", None, ca=True)
    other_ca = _issue("Someone else's CA", None, ca=True)
    return Pki(
        ca,
        _issue("localhost", ca, san="localhost"),
        _issue("device-1", ca),
        _issue("device-2", other_ca),
        tmp_path,
    )


async def _health(address: str, creds: grpc.ChannelCredentials) -> int:
    options = (("grpc.ssl_target_name_override", "localhost"),)
    async with grpc.aio.secure_channel(address, creds, options=options) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=30
        )
    return int(resp.status)


def test_loopback_names() -> None:
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert is_loopback("[::1]")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("::")
    assert not is_loopback("192.168.1.10")


async def test_plaintext_beyond_loopback_is_refused(tmp_path: Path) -> None:
    config = ServerConfig(host="0.0.0.0", port=0, data_dir=tmp_path, grace_seconds=0.5)
    with pytest.raises(SystemExit, match="--insecure"):
        async with running_server(config):
            pass


async def test_insecure_allows_it_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = ServerConfig(
        host="0.0.0.0", port=0, data_dir=tmp_path, grace_seconds=0.5, insecure=True
    )
    with caplog.at_level(logging.WARNING):
        async with running_server(config) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                resp = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=30
                )
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert any("plaintext" in r.getMessage() for r in caplog.records if r.levelno >= 30)


async def test_tls_key_readable_by_others_is_refused(pki: Pki) -> None:
    cert, key, _ = pki.files()
    key.chmod(0o644)
    config = ServerConfig(port=0, data_dir=pki.dir, tls_cert=cert, tls_key=key)
    with pytest.raises(SystemExit, match="chmod 600"):
        async with running_server(config):
            pass


async def test_tls_serves_beyond_loopback_rules(pki: Pki) -> None:
    cert, key, _ = pki.files()
    config = ServerConfig(
        host="0.0.0.0", port=0, data_dir=pki.dir, tls_cert=cert, tls_key=key, grace_seconds=0.5
    )
    async with running_server(config) as server:
        creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
        status = await _health(f"127.0.0.1:{server.port}", creds)
    assert status == health_pb2.HealthCheckResponse.SERVING


async def test_mutual_tls_requires_a_device_certificate_from_the_ca(pki: Pki) -> None:
    cert, key, ca = pki.files()
    config = ServerConfig(
        port=0, data_dir=pki.dir, tls_cert=cert, tls_key=key, tls_client_ca=ca, grace_seconds=0.5
    )
    async with running_server(config) as server:
        address = f"127.0.0.1:{server.port}"
        with_cert = grpc.ssl_channel_credentials(pki.ca.cert, pki.client.key, pki.client.cert)
        assert await _health(address, with_cert) == health_pb2.HealthCheckResponse.SERVING

        without = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _health(address, without)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE

        foreign = grpc.ssl_channel_credentials(pki.ca.cert, pki.stranger.key, pki.stranger.cert)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _health(address, foreign)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE

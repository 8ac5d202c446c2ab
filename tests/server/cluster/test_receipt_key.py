"""Replicas over one PostgreSQL share one receipt key, or the second one refuses to start.

Each server here has a data directory of its own (as replicas on different machines do); the
database keeps the key's fingerprint, never the key.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from pulsesync.server.compose import RECEIPT_KEY_FINGERPRINT
from pulsesync.server.privacy.keys import RECEIPT_KEY_ENV, ReceiptKey
from pulsesync.server.profiles.crypto import KEK_ENV, FileKeyStore, KeyFileError
from tests.support.postgres import postgres_database, postgres_dsn
from tests.support.server import start_server, stored_rows

__all__ = ["postgres_database", "postgres_dsn"]


@pytest.fixture(autouse=True)
def shared_kek(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEK_ENV, FileKeyStore.create(tmp_path / "kek.key").path.read_text())


async def test_a_replica_with_another_receipt_key_refuses_to_start(
    tmp_path: Path, postgres_dsn: str
) -> None:
    async with start_server(tmp_path / "a", database=postgres_dsn) as a:
        rows = await stored_rows(
            a, "SELECT secret FROM server_secrets WHERE name = ?", RECEIPT_KEY_FINGERPRINT
        )
        key = ReceiptKey.load(tmp_path / "a" / "receipt.key")
        assert [bytes(r[0]).decode() for r in rows] == [key.fingerprint()]
        assert key.fingerprint() not in (tmp_path / "a" / "receipt.key").read_text()
        with pytest.raises(KeyFileError, match="receipt key"):
            async with start_server(tmp_path / "b", database=postgres_dsn):
                pass


async def test_replicas_given_the_same_receipt_key_start_and_agree(
    tmp_path: Path, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(RECEIPT_KEY_ENV, secrets.token_hex(32))
    async with (
        start_server(tmp_path / "a", database=postgres_dsn) as a,
        start_server(tmp_path / "b", database=postgres_dsn) as b,
    ):
        signed = a.app.privacy.key.sign(b"receipt")
        assert b.app.privacy.key.verify(b"receipt", signed)
    assert not (tmp_path / "a" / "receipt.key").exists()  # the environment's key, no file


def test_a_malformed_receipt_key_in_the_environment_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(RECEIPT_KEY_ENV, "not-hex")
    with pytest.raises(Exception, match="64 hex digits"):
        ReceiptKey.load(tmp_path / "receipt.key")

"""The server's receipt key: signs deletion receipts and derives audit-log pseudonyms.

It lives beside the database (DATA_DIR/receipt.key, mode 0600) and is created on first use,
or comes from PULSESYNC_RECEIPT_KEY (64 hex digits, e.g. from a secret manager), which takes
precedence. Several replicas over one PostgreSQL must share it, as they share the key-encryption
key: a receipt signed on one is verified on another, and one person keeps one pseudonym in the
audit log. It is never stored in the database (with it, a database backup could link the audit
log's pseudonyms back to people); the database keeps only its fingerprint, and a replica whose
key does not match it refuses to start. It is not an encryption key: losing it only means old
receipts can no longer be verified and old audit entries can no longer be linked to each other.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path
from typing import Final

from pulsesync.server.errors import FailedPrecondition
from pulsesync.server.storage.files import create_secret_file

RECEIPT_KEY_FILE: Final = "receipt.key"
RECEIPT_KEY_ENV: Final = "PULSESYNC_RECEIPT_KEY"
# 256 bits: the full strength of HMAC-SHA256.
_KEY_BYTES: Final = 32


class ReceiptKey:
    """HMAC-SHA256 under a secret kept in a 0600 file."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < _KEY_BYTES:
            raise ValueError("receipt key is too short")
        self._secret = secret

    @classmethod
    def load(cls, path: Path) -> ReceiptKey:
        """The key from PULSESYNC_RECEIPT_KEY when set, else from the file (created if missing)."""
        raw = os.environ.get(RECEIPT_KEY_ENV, "").strip()
        if not raw:
            return cls.load_or_create(path)
        try:
            secret = bytes.fromhex(raw)
        except ValueError:
            secret = b""
        if len(secret) < _KEY_BYTES:
            raise FailedPrecondition(
                f"{RECEIPT_KEY_ENV} must be {2 * _KEY_BYTES} hex digits (the content of a "
                "receipt.key file)",
                reason="KEY_FILE_CORRUPT",
            )
        return cls(secret)

    @classmethod
    def load_or_create(cls, path: Path) -> ReceiptKey:
        """Read the key file, creating it (mode 0600) when missing."""
        create_secret_file(path, _KEY_BYTES)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise FailedPrecondition(
                f"receipt key {path} is readable by other users (mode {mode:o}); "
                f"run `chmod 600 {path}`",
                reason="KEY_FILE_PERMISSIONS",
            )
        try:
            secret = bytes.fromhex(path.read_text("ascii").strip())
        except ValueError:
            raise FailedPrecondition(
                f"receipt key {path} is not hex; restore it from backup or delete it "
                "(old receipts then no longer verify)",
                reason="KEY_FILE_CORRUPT",
            ) from None
        return cls(secret)

    def fingerprint(self) -> str:
        """Names this key without revealing it: replicas compare fingerprints to be sure they
        share one key."""
        return self.sign(b"pulsesync/receipt-key-fingerprint/v1")[:32]

    def sign(self, message: bytes) -> str:
        """Hex HMAC-SHA256 of message."""
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def verify(self, message: bytes, signature: str) -> bool:
        """Whether signature is this key's HMAC of message (constant time)."""
        return hmac.compare_digest(self.sign(message), signature)

    def pseudonym(self, user_id: int, create_us: int) -> str:
        """A stable, unlinkable-without-the-key name for one person in the audit log."""
        return self.sign(f"subject:{user_id}:{create_us}".encode())[:32]

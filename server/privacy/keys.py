"""The server's receipt key: signs deletion receipts and derives audit-log pseudonyms.

It lives beside the database (DATA_DIR/receipt.key, mode 0600) and is created on first use.
It is not an encryption key: losing it only means old receipts can no longer be verified and
old audit entries can no longer be linked to each other.
"""

from __future__ import annotations

import hashlib
import hmac
import stat
from pathlib import Path
from typing import Final

from pulsesync.server.errors import FailedPrecondition
from pulsesync.server.storage.files import create_secret_file

RECEIPT_KEY_FILE: Final = "receipt.key"
# 256 bits: the full strength of HMAC-SHA256.
_KEY_BYTES: Final = 32


class ReceiptKey:
    """HMAC-SHA256 under a secret kept in a 0600 file."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < _KEY_BYTES:
            raise ValueError("receipt key is too short")
        self._secret = secret

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

    def sign(self, message: bytes) -> str:
        """Hex HMAC-SHA256 of message."""
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def verify(self, message: bytes, signature: str) -> bool:
        """Whether signature is this key's HMAC of message (constant time)."""
        return hmac.compare_digest(self.sign(message), signature)

    def pseudonym(self, user_id: int, create_us: int) -> str:
        """A stable, unlinkable-without-the-key name for one person in the audit log."""
        return self.sign(f"subject:{user_id}:{create_us}".encode())[:32]

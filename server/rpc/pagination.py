"""AIP-158 paging shared by every List method: page sizes and opaque, bound page tokens.

A token is base64url of a random nonce (12) and the AES-256-GCM sealing of

    version (1) | caller digest (8) | query digest (16) | position (JSON)

under a server secret kept in the database (`server_secrets`, made by the first server to start
over it), so that every replica of a deployment reads the same one: a token handed out by one
replica is good on any other, as a client that moves between them needs. Sealed rather than only signed: a client can neither read
the position (ids, times) nor make or alter a token, so the paging scheme can change behind
it. The GCM tag (128 bits) makes a hand-made or altered token fail; the digests bind a token to the caller's user, the method and every query parameter other than
page_size and page_token, so a token reused with a different query is refused with a reason
that says so instead of returning a page of some other listing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
from collections.abc import Sequence
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pulsesync.server.errors import InvalidArgument

_VERSION: Final = 1
_NONCE_BYTES: Final = 12  # GCM's standard nonce; random, so one key seals any number of tokens
_HEAD: Final = 1 + 8 + 16
_AAD: Final = b"pulsesync.v1 page token"

Position = list[int | str]


def page_size(requested: int, default: int, maximum: int) -> int:
    """The page size to use: default for 0, clamped to maximum; negative is INVALID_ARGUMENT."""
    if requested < 0:
        raise InvalidArgument(
            f"page_size must not be negative (0 means the default, {default}; at most {maximum})",
            reason="INVALID_PAGE_SIZE",
        )
    return min(requested or default, maximum)


def _digest(n: int, *parts: object) -> bytes:
    text = json.dumps(list(parts), default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).digest()[:n]


class PageTokens:
    """Encodes and checks page tokens under one secret."""

    def __init__(self, secret: bytes) -> None:
        self._aead = AESGCM(hashlib.sha256(b"page-token:" + secret).digest())

    def encode(self, method: str, user_id: int, query: Sequence[object], position: Position) -> str:
        """The token for the page after position, bound to the method, caller and query."""
        body = (
            bytes([_VERSION])
            + _digest(8, user_id)
            + _digest(16, method, *query)
            + json.dumps(position, separators=(",", ":")).encode()
        )
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = nonce + self._aead.encrypt(nonce, body, _AAD)
        return base64.urlsafe_b64encode(sealed).decode().rstrip("=")

    def decode(
        self, token: str, method: str, user_id: int, query: Sequence[object]
    ) -> Position | None:
        """The position in token (None for an empty token); INVALID_ARGUMENT when refused."""
        if not token:
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            body = self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _AAD)
        except (binascii.Error, ValueError, InvalidTag):
            body = b""
        if len(body) <= _HEAD:
            raise InvalidArgument(
                "page_token is not a token this server issued: pass next_page_token unchanged, "
                "or start again without it",
                reason="INVALID_PAGE_TOKEN",
            )
        if body[0] != _VERSION or body[1:9] != _digest(8, user_id):
            raise InvalidArgument(
                "page_token was issued for another account or server version; start again "
                "without it",
                reason="INVALID_PAGE_TOKEN",
            )
        if body[9:_HEAD] != _digest(16, method, *query):
            raise InvalidArgument(
                "page_token belongs to a different query: send the same parameters (all but "
                "page_size) as the request that returned it, or start again without it",
                reason="PAGE_TOKEN_QUERY_MISMATCH",
            )
        position: Any = json.loads(body[_HEAD:])
        return list(position)


_codecs: dict[bytes, PageTokens] = {}


def page_tokens(secret: bytes) -> PageTokens:
    """The codec for a server's page-token secret (RpcContext.page_token_secret)."""
    codec = _codecs.get(secret)
    if codec is None:
        codec = _codecs[secret] = PageTokens(secret)
    return codec

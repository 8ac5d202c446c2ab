"""Safe retries of mutating calls (AIP-155): a call with a request_id is carried out once, and a
retry within the window gets the first call's answer instead of a second effect.

A client that lost a response (a timeout, a dropped connection) cannot know whether the call
took effect; with a request_id it simply sends the same request again. What is kept per call:

* a handle, to find the answer: HKDF-SHA256 of the request_id, with the method and the caller's
  scope (the device, or the pairing code for PairDevice) as context, so one id used by two
  devices or for two methods names two records;
* a fingerprint of the request without its request_id (HMAC-SHA256 under a key derived the same
  way), so the same id with a different request is refused instead of answered wrongly;
* the response, sealed with AES-256-GCM under a third derived key.

The request_id is a UUID the server never stores, so the table alone yields neither the tokens
that PairDevice and RotateDeviceToken answer with nor any personal data of the responses.

Only successful answers are kept: a refused call changed nothing and is decided afresh on
retry. A call with a request_id runs to its end once started, even if the client goes away
meanwhile, so that the retry after a lost response finds the answer.

Concurrent retries never both take effect, on one server or across replicas: calls with the
same handle wait for each other within this process (a lock), and before running, the call
claims its handle in the database (one row per handle: the first claimer holds it, in one
statement). A retry that finds another replica's claim waits for that call's answer, polling;
a claim whose replica died expires after CLAIM_US and the next retry carries the call out. A
call that fails or is cancelled drops its claim, so that its retry is decided afresh at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from google.protobuf.message import Message

from pulsesync.server.clock import Clock
from pulsesync.server.errors import Aborted, InvalidArgument
from pulsesync.server.storage.idempotency import IdempotencyStorage, StoredAnswer

log = logging.getLogger(__name__)

# How long a first answer is kept. Long enough for an app that lost a response to retry after
# the phone slept or went offline for the night; short enough that the table stays one day of
# mutating calls.
WINDOW_US: Final = 24 * 3600 * 1_000_000
# How long a stopping server lets such calls finish: they are short writes, and a stop must end.
DRAIN_TIMEOUT_S: Final = 10.0
# How long a claim holds a handle while its call runs. Such calls are short writes (a stopping
# server gives them DRAIN_TIMEOUT_S); one claimed longer ago than this is presumed dead with
# its replica, and a retry elsewhere carries the call out. Short, because that retry waits.
CLAIM_US: Final = 30 * 1_000_000
# A retry that finds another replica's live claim asks again after these delays (doubling):
# the first answers come within milliseconds; a dead replica's claim takes CLAIM_US.
_CLAIM_POLL_FIRST_S: Final = 0.01
_CLAIM_POLL_MAX_S: Final = 0.25
# ... and gives up (REQUEST_IN_PROGRESS, the client retries later) after waiting this long:
# longer than a claim lives, so only a claimer whose clock runs behind or a call stuck past
# its claim makes a retry wait that long.
_CLAIM_WAIT_S: Final = CLAIM_US / 1_000_000 + 5.0
FIELD: Final = "request_id"
_NONCE_BYTES: Final = 12
_INFO: Final = b"pulsesync.v1 request_id\x00"

M = TypeVar("M", bound=Message)


def request_id_of(request: Message) -> str:
    """The request's request_id ("" when the message has none or it is unset)."""
    if FIELD not in request.DESCRIPTOR.fields_by_name:
        return ""
    return str(getattr(request, FIELD))


def request_id_in(raw: bytes, field_number: int) -> str:
    """The request_id in a serialized request, found by walking its top-level fields only
    (a request taken as bytes, e.g. a 5000-event batch, is not parsed for it); "" when it is
    absent or the bytes do not parse, which the method itself then reports."""
    found, pos, end = "", 0, len(raw)
    try:
        while pos < end:
            key, pos = _varint(raw, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(raw, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                size, pos = _varint(raw, pos)
                if number == field_number:
                    found = raw[
                        pos : pos + size
                    ].decode()  # the last occurrence wins, as in protobuf
                pos += size
            else:
                return ""
        return found if pos == end else ""
    except (IndexError, UnicodeDecodeError):
        return ""


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def _canonical_id(request_id: str) -> str:
    try:
        return str(uuid.UUID(request_id))
    except ValueError:
        raise InvalidArgument(
            "request_id must be a UUID (e.g. from crypto.randomUUID()), or empty",
            reason="INVALID_REQUEST_ID",
            metadata={"field": FIELD},
        ) from None


class _Keys:
    """What one (request_id, method, scope) derives: lookup handle, MAC key, sealing key."""

    __slots__ = ("handle", "mac_key", "seal_key")

    def __init__(self, request_id: str, method: str, scope: str) -> None:
        info = _INFO + method.encode() + b"\x00" + scope.encode()
        okm = HKDF(algorithm=SHA256(), length=96, salt=None, info=info).derive(request_id.encode())
        self.handle, self.mac_key, self.seal_key = okm[:32], okm[32:64], okm[64:]

    def fingerprint(self, method: str, request: Message) -> bytes:
        bare = type(request)()
        bare.CopyFrom(request)
        bare.ClearField(FIELD)
        body = method.encode() + b"\x00" + bare.SerializeToString(deterministic=True)
        return hmac.new(self.mac_key, body, hashlib.sha256).digest()


class Idempotency:
    """Runs calls with a request_id once per window, answering retries from storage."""

    def __init__(
        self, storage: IdempotencyStorage, clock: Clock, *, window_us: int = WINDOW_US
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._window_us = window_us
        # handle -> (lock, users): retries of one call wait for each other; an entry lives
        # only while some call holds or awaits it.
        self._locks: dict[bytes, tuple[asyncio.Lock, int]] = {}
        # Calls running on after their client went away; drained before storage closes.
        self._running: set[asyncio.Task[object]] = set()

    async def run(
        self,
        *,
        method: str,
        scope: str,
        request: Message,
        response_type: type[M],
        call: Callable[[], Awaitable[M]],
        owner: Callable[[M], Awaitable[int | None]],
    ) -> M:
        """call()'s answer, or the stored answer of an earlier call with this request's
        request_id (which must be set) by the same scope; owner(answer) is the person whose
        erasure removes the stored answer."""
        keys = _Keys(_canonical_id(request_id_of(request)), method, scope)
        fingerprint = keys.fingerprint(method, request)
        task: asyncio.Task[M] = asyncio.ensure_future(
            self._once(keys, method, fingerprint, response_type, call, owner)
        )
        self._running.add(task)
        task.add_done_callback(self._finished)
        # Shielded: a client that times out cancels its call, but the call goes on, so that
        # its effect and its stored answer stay together for the retry.
        return await asyncio.shield(task)

    def _finished(self, task: asyncio.Task[object]) -> None:
        self._running.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the caller may be gone, the seam already reported it

    async def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Let calls still running after their clients left finish (before storage closes);
        those not done within timeout_s are cancelled, so a stuck call cannot hold up a stop."""
        if not self._running:
            return
        _, late = await asyncio.wait(set(self._running), timeout=timeout_s)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)

    async def _once(
        self,
        keys: _Keys,
        method: str,
        fingerprint: bytes,
        response_type: type[M],
        call: Callable[[], Awaitable[M]],
        owner: Callable[[M], Awaitable[int | None]],
    ) -> M:
        lock, users = self._locks.get(keys.handle, (asyncio.Lock(), 0))
        self._locks[keys.handle] = (lock, users + 1)
        try:
            async with lock:
                claim_id = os.urandom(_NONCE_BYTES)
                stored = await self._claim(keys, claim_id, method, fingerprint)
                if stored is not None:
                    return self._replay(keys, method, fingerprint, stored, response_type)
                try:
                    response = await call()
                except BaseException:
                    await self._release(keys.handle, claim_id, method)
                    raise
                await self._keep(keys, method, fingerprint, response, owner)
                return response
        finally:
            lock, users = self._locks[keys.handle]
            if users <= 1:
                del self._locks[keys.handle]
            else:
                self._locks[keys.handle] = (lock, users - 1)

    async def _claim(
        self, keys: _Keys, claim_id: bytes, method: str, fingerprint: bytes
    ) -> StoredAnswer | None:
        """The stored answer of an earlier call, or None once this call holds the handle
        (waiting while a call on another replica holds it)."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + _CLAIM_WAIT_S
        delay = _CLAIM_POLL_FIRST_S
        while True:
            now = self._clock.now_us()
            found = await self._storage.claim(
                keys.handle,
                claim_id,
                method=method,
                fingerprint=fingerprint,
                now_us=now,
                expire_us=now + CLAIM_US,
            )
            if found.held:
                return None
            if found.answer is not None:
                return found.answer
            if loop.time() >= give_up_at:
                raise Aborted(
                    "another server is still carrying out a call with this request_id; retry "
                    "the same request (same request_id) later to get its answer",
                    reason="REQUEST_IN_PROGRESS",
                    metadata={"field": FIELD},
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _CLAIM_POLL_MAX_S)

    async def _release(self, handle: bytes, claim_id: bytes, method: str) -> None:
        """Drop this call's claim after it failed or was cancelled, so a retry is decided
        afresh at once; shielded, so a cancellation does not stop it half-way."""
        try:
            await asyncio.shield(self._storage.release(handle, claim_id))
        except asyncio.CancelledError:
            raise
        except Exception:
            # The claim then expires after CLAIM_US; a retry before that waits for it.
            log.exception("could not release a request_id claim", extra={"method": method})

    def _replay(
        self,
        keys: _Keys,
        method: str,
        fingerprint: bytes,
        stored: StoredAnswer,
        response_type: type[M],
    ) -> M:
        if stored.method != method or not hmac.compare_digest(stored.fingerprint, fingerprint):
            raise InvalidArgument(
                f"this request_id was used within the last {self._window_us // 3_600_000_000} "
                "hours for a different request; pick a new request_id for a new call and "
                "reuse it only for retries of that same call",
                reason="REQUEST_ID_REUSED",
                metadata={"field": FIELD},
            )
        # A wrong tag (InvalidTag) means the stored row was altered: INTERNAL, never a guess.
        plain = AESGCM(keys.seal_key).decrypt(stored.nonce, stored.ciphertext, keys.handle)
        return response_type.FromString(plain)

    async def _keep(
        self,
        keys: _Keys,
        method: str,
        fingerprint: bytes,
        response: M,
        owner: Callable[[M], Awaitable[int | None]],
    ) -> None:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = AESGCM(keys.seal_key).encrypt(
            nonce, response.SerializeToString(deterministic=True), keys.handle
        )
        now = self._clock.now_us()
        try:
            await self._storage.put(
                keys.handle,
                StoredAnswer(method, fingerprint, nonce, sealed),
                user_id=await owner(response),
                now_us=now,
                expire_us=now + self._window_us,
            )
        except Exception:
            # The call took effect: its client gets the answer all the same; only a retry of
            # this call would be carried out again (once its claim lapsed, after CLAIM_US).
            log.exception("could not keep the answer for retries", extra={"method": method})

"""Encryption at rest: AES-256-GCM under per-user data keys wrapped by a key-encryption key.

    KEK (key file or KMS) --wraps--> data key (one per user) --encrypts--> profile versions

* Each profile version is sealed with AES-256-GCM under the user's data key, with a fresh
  random 96-bit nonce per write. The associated data binds the user id, the profile version
  and the data key id, so a ciphertext moved to another user or another version (a swap or a
  replay) fails authentication instead of decrypting to the wrong profile.
* Data keys are wrapped with AES-256-GCM too (not RFC 3394 key wrap): GCM takes associated
  data, which binds each wrapped key to its user and key id so wrapped keys cannot be swapped
  between users either; key wrap has no associated data, and its one advantage (no nonce) is
  moot when a KEK wraps one key per user, far below the 2**32 random-nonce bound.
  It is also the shape of a cloud KMS's Encrypt/Decrypt with an encryption context, so
  `KeyStore` maps onto one directly.
* Rotation wraps every data key under a new KEK; profile ciphertexts are untouched, so old
  versions stay readable. Erasing a person destroys their data key (crypto-shredding).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import stat
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol

import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pulsesync.server.errors import PulseSyncError
from pulsesync.server.storage.keys import WrappedKey

KEY_BYTES: Final = 32  # AES-256
NONCE_BYTES: Final = 12  # 96 bits: GCM's native nonce size (no GHASH of the IV)
_KEK_FORMAT: Final = "pulsesync-kek-v1"
# The key file's content in the environment (e.g. from a secret manager), for replicas that
# share no file system; takes precedence over the key file.
KEK_ENV: Final = "PULSESYNC_KEK"
_PROFILE_AAD: Final = b"pulsesync/profile/v1"
_DATA_KEY_AAD: Final = b"pulsesync/data-key/v1"


class ProfileIntegrityError(PulseSyncError):
    """Stored profile data failed authentication: altered, swapped or replayed."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = "PROFILE_INTEGRITY"


class KeyFileError(SystemExit):
    """The key-encryption key is missing, unreadable or wrong: the server must not start."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class KeyStore(Protocol):
    """Wraps and unwraps data keys; the file store below, or a cloud KMS."""

    @property
    def primary_id(self) -> str:
        """The KEK that wraps new data keys."""
        ...

    def key_ids(self) -> frozenset[str]:
        """Every KEK this store can unwrap with."""
        ...

    async def wrap(self, data_key: bytes, context: bytes) -> WrappedKey:
        """Wrap data_key under the primary KEK, bound to context."""
        ...

    async def unwrap(self, wrapped: WrappedKey, context: bytes) -> bytes:
        """The data key; ProfileIntegrityError if it does not authenticate."""
        ...


def kek_id_of(key: bytes) -> str:
    """A KEK's public id: a hash of the key, so a different key can never pose as it."""
    return "kek_" + hashlib.sha256(b"pulsesync kek id\0" + key).hexdigest()[:16]


def _aead_seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def shared_with_others(path: Path, st: os.stat_result, what: str) -> str | None:
    """Why a secret file must not be used, if group or others may access it (else None)."""
    if not st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return None
    return (
        f"{what} {path} is accessible by other users (mode "
        f"{stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}` and start again"
    )


@dataclass(frozen=True, slots=True)
class _Kek:
    kek_id: str
    key: bytes
    created: str


class FileKeyStore:
    """KEKs in a JSON key file (mode 0600). The last one listed is the primary."""

    def __init__(self, path: Path, keks: list[_Kek]) -> None:
        if not keks:
            raise KeyFileError(f"key file {path} holds no key; restore it from a backup")
        self.path = path
        self._keks = {k.kek_id: k for k in keks}
        self._order = [k.kek_id for k in keks]
        self._mtime_ns = path.stat().st_mtime_ns if path.exists() else 0
        # Keys from the environment: nothing to reload, no file to rotate in.
        self.read_only = False

    # -- file handling ---------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path) -> FileKeyStore:
        """Create a key file with one fresh KEK (fails if the file exists)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        kek = cls._new_kek()
        cls._write(path, [kek], exclusive=True)
        return cls(path, [kek])

    @classmethod
    def load(cls, path: Path) -> FileKeyStore:
        """Read an existing key file, refusing one that others can read or that is corrupt."""
        try:
            st = path.stat()
            raw = path.read_bytes()
        except OSError as e:
            raise KeyFileError(f"cannot read the key file {path}: {e.strerror}") from None
        if (problem := shared_with_others(path, st, "the key file")) is not None:
            raise KeyFileError(problem)
        return cls(path, cls._parse(raw, f"the key file {path}"))

    @classmethod
    def from_env(cls) -> FileKeyStore | None:
        """The keys given in PULSESYNC_KEK (the key file's content), or None when unset: how
        every replica of a deployment gets the same keys from a secret manager. Read-only:
        a rotation writes a key file, then the variable is updated from it."""
        raw = os.environ.get(KEK_ENV, "")
        if not raw.strip():
            return None
        store = cls(Path(f"${KEK_ENV}"), cls._parse(raw.encode(), f"${KEK_ENV}"))
        store.read_only = True
        return store

    @staticmethod
    def _parse(raw: bytes, where: str) -> list[_Kek]:
        try:
            doc = json.loads(raw)
            if doc.get("format") != _KEK_FORMAT:
                raise ValueError(f"format is not {_KEK_FORMAT}")
            keks = []
            for entry in doc["keys"]:
                key = base64.b64decode(entry["key"], validate=True)
                if len(key) != KEY_BYTES:
                    raise ValueError("a key is not 256 bits")
                if entry["id"] != kek_id_of(key):
                    raise ValueError(f"key {entry['id']} does not match its id")
                keks.append(_Kek(entry["id"], key, entry.get("created", "")))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise KeyFileError(
                f"{where} is not a valid PulseSync key file ({e}); restore it from a backup, "
                "or point --key-file / PULSESYNC_KEY_FILE (or PULSESYNC_KEK) at the right keys"
            ) from None
        return keks

    @classmethod
    def open(cls, path: Path, *, must_exist: bool) -> tuple[FileKeyStore, bool]:
        """Load the key file, or create it when allowed; also whether it was created."""
        if path.exists():
            return cls.load(path), False
        if must_exist:
            raise KeyFileError(f"the key file {path} does not exist")
        return cls.create(path), True

    @staticmethod
    def _new_kek() -> _Kek:
        key = AESGCM.generate_key(bit_length=256)
        return _Kek(kek_id_of(key), key, datetime.now(UTC).isoformat(timespec="seconds"))

    @staticmethod
    def _write(path: Path, keks: list[_Kek], *, exclusive: bool = False) -> None:
        doc = {
            "format": _KEK_FORMAT,
            "note": "PulseSync key-encryption keys. Back this file up apart from the database; "
            "without it the stored profiles cannot be decrypted. The last key is the primary.",
            "keys": [
                {"id": k.kek_id, "created": k.created, "key": base64.b64encode(k.key).decode()}
                for k in keks
            ],
        }
        data = (json.dumps(doc, indent=2) + "\n").encode()
        target = path if exclusive else path.with_name(path.name + ".tmp")
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
        fd = os.open(target, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if not exclusive:
            os.replace(target, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _reload_if_changed(self) -> None:
        if self.read_only:
            return
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return
        if mtime != self._mtime_ns:
            fresh = FileKeyStore.load(self.path)
            self._keks, self._order, self._mtime_ns = fresh._keks, fresh._order, mtime

    # -- rotation --------------------------------------------------------------------------
    def add_primary(self) -> str:
        """Append a fresh KEK as the new primary (the file is replaced atomically)."""
        self._refuse_if_read_only()
        self._reload_if_changed()
        kek = self._new_kek()
        keks = [*(self._keks[i] for i in self._order), kek]
        self._write(self.path, keks)
        self._keks[kek.kek_id] = kek
        self._order.append(kek.kek_id)
        self._mtime_ns = self.path.stat().st_mtime_ns
        return kek.kek_id

    def drop(self, kek_ids: set[str]) -> None:
        """Remove retired KEKs that no data key is wrapped with any more (never the primary)."""
        self._refuse_if_read_only()
        keep = [self._keks[i] for i in self._order if i not in kek_ids or i == self.primary_id]
        self._write(self.path, keep)
        self._keks = {k.kek_id: k for k in keep}
        self._order = [k.kek_id for k in keep]
        self._mtime_ns = self.path.stat().st_mtime_ns

    def _refuse_if_read_only(self) -> None:
        if self.read_only:
            raise KeyFileError(
                f"the keys come from {KEK_ENV}: rotate them in a key file (--key-file, with "
                f"{KEK_ENV} unset), then give every replica the new file's content"
            )

    # -- KeyStore --------------------------------------------------------------------------
    @property
    def primary_id(self) -> str:
        return self._order[-1]

    def key_ids(self) -> frozenset[str]:
        self._reload_if_changed()
        return frozenset(self._keks)

    async def wrap(self, data_key: bytes, context: bytes) -> WrappedKey:
        self._reload_if_changed()  # a rotation by the CLI while serving adds a new primary
        kek = self._keks[self.primary_id]
        return WrappedKey(kek.kek_id, _aead_seal(kek.key, data_key, context))

    async def unwrap(self, wrapped: WrappedKey, context: bytes) -> bytes:
        kek = self._keks.get(wrapped.kek_id)
        if kek is None:
            self._reload_if_changed()
            kek = self._keks.get(wrapped.kek_id)
        if kek is None:
            raise KeyFileError(
                f"the key file {self.path} does not hold {wrapped.kek_id}, which wraps a "
                "profile data key; restore the key file that belongs to this database"
            )
        blob = wrapped.blob
        try:
            return AESGCM(kek.key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], context)
        except InvalidTag:
            raise ProfileIntegrityError(
                f"a wrapped data key failed authentication under {kek.kek_id}: the key row was "
                "altered or copied from another user; restore the database from a backup"
            ) from None


def data_key_context(user_id: int, key_id: str) -> bytes:
    """Associated data of a wrapped data key: which user and which key."""
    return _DATA_KEY_AAD + struct.pack(">q", user_id) + key_id.encode()


def profile_aad(user_id: int, version: int, key_id: str) -> bytes:
    """Associated data of a sealed profile: user, version and data key id."""
    return _PROFILE_AAD + struct.pack(">qQ", user_id, version) + key_id.encode()


class Sealer(Protocol):
    """Seals one profile version under a data key (AES-GCM in the server; the profile
    benchmark injects a plaintext one for its baseline)."""

    def forget(self, key: bytes) -> None:
        """Drop anything cached for a destroyed key."""
        ...

    def seal(self, key: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """(nonce, ciphertext) for plaintext."""
        ...

    def open(self, key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """The plaintext; raises InvalidTag when it does not authenticate."""
        ...


class AesGcmSealer:
    """AES-256-GCM with a fresh random 96-bit nonce per seal."""

    def __init__(self) -> None:
        # AESGCM objects hold the expanded key schedule: keep one per data key.
        self._ciphers: dict[bytes, AESGCM] = {}

    def _cipher(self, key: bytes) -> AESGCM:
        c = self._ciphers.get(key)
        if c is None:
            c = self._ciphers[key] = AESGCM(key)
        return c

    def forget(self, key: bytes) -> None:
        """Drop the cached cipher of a destroyed key."""
        self._ciphers.pop(key, None)

    def seal(self, key: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce, self._cipher(key).encrypt(nonce, plaintext, aad)

    def open(self, key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        return self._cipher(key).decrypt(nonce, ciphertext, aad)

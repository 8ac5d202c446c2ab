"""Export: everything held about a person as JSON Lines per record type plus a manifest.

The archive is produced as a stream of (file name, chunk) pairs so neither the server nor the
client holds it in memory: one `<record type>.jsonl` per table with a `user_id` column (read
in one snapshot) and per component exporter, then `manifest.json` with each file's record
count, size and SHA-256. docs/privacy.md documents the format.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import zipfile
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO, Final

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from pulsesync.server.privacy.registry import UserDataRegistry
from pulsesync.server.storage.privacy import PrivacyStorage, UserTable
from pulsesync.v1 import events_pb2

FORMAT: Final = "pulsesync-export"
FORMAT_VERSION: Final = 1
MANIFEST: Final = "manifest.json"
# 64 KiB per message: far below gRPC's message limit, big enough that framing costs nothing.
CHUNK_BYTES: Final = 64 * 1024
# Blob columns holding a serialized pulsesync.v1.Event; exported as the event's JSON form.
EVENT_BLOB_COLUMNS: Final = frozenset({("events", "body"), ("quarantine", "body")})
_MEMBER_NAME: Final = re.compile(r"^[a-z0-9_]+\.jsonl$|^manifest\.json$")


@dataclass(frozen=True, slots=True)
class ExportedFile:
    """A manifest entry."""

    name: str
    record_type: str
    source: str  # "table" or "component"
    count: int
    bytes: int
    sha256: str
    omitted_columns: tuple[str, ...] = ()


def encode_blob(table: str, column: str, value: bytes) -> dict[str, Any]:
    """An event body as its JSON form when that is lossless and possible, otherwise
    {"base64": ...} (the exact bytes, never an error: export of everything held must work)."""
    if (table, column) in EVENT_BLOB_COLUMNS:
        try:
            event = events_pb2.Event.FromString(value)
        except DecodeError:
            event = None
        if event is not None and event.SerializeToString() == value:
            try:
                return json_format.MessageToDict(event, preserving_proto_field_name=True)
            except (json_format.Error, ValueError):
                # A value protobuf's JSON form cannot carry (a Timestamp outside years
                # 0001-9999, nanos out of range): quarantine holds such events as received.
                pass
    return {"base64": base64.b64encode(value).decode("ascii")}


def _json_default(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"base64": base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"cannot export a {type(value).__name__}")


def _line(record: dict[str, Any]) -> bytes:
    return (
        json.dumps(record, ensure_ascii=False, sort_keys=False, default=_json_default) + "\n"
    ).encode("utf-8")


class _FileWriter:
    """Buffers one archive member's lines into chunks, counting and hashing as it goes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0
        self.size = 0
        self._hash = hashlib.sha256()
        self._buf = bytearray()

    def add(self, record: dict[str, Any]) -> bytes | None:
        data = _line(record)
        self.count += 1
        self.size += len(data)
        self._hash.update(data)
        self._buf += data
        if len(self._buf) >= CHUNK_BYTES:
            out = bytes(self._buf)
            self._buf.clear()
            return out
        return None

    def finish(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def _record(table: UserTable, row: dict[str, object]) -> dict[str, Any]:
    return {
        name: encode_blob(table.name, name, value) if isinstance(value, bytes) else value
        for name, value in row.items()
    }


async def export_user(
    storage: PrivacyStorage, registry: UserDataRegistry, user_id: int, now_us: int
) -> AsyncIterator[tuple[str, bytes]]:
    """Stream the person's archive as (member name, chunk); the manifest comes last.

    Every member yields at least one (possibly empty) chunk, so an empty record type still
    appears in the archive.
    """
    files: list[ExportedFile] = []
    writer: _FileWriter | None = None
    current: UserTable | None = None

    def finished(writer: _FileWriter, table: UserTable) -> ExportedFile:
        return ExportedFile(
            writer.name, table.name, "table", writer.count, writer.size,
            writer.sha256, table.omitted_columns,
        )  # fmt: skip

    async for table, row in storage.export_rows(user_id, frozenset(registry.exporters)):
        if row is None:  # the next table starts
            if writer is not None and current is not None:
                yield writer.name, writer.finish()
                files.append(finished(writer, current))
            writer, current = _FileWriter(f"{table.name}.jsonl"), table
            continue
        assert writer is not None
        chunk = writer.add(_record(table, row))
        if chunk:
            yield writer.name, chunk
    if writer is not None and current is not None:
        yield writer.name, writer.finish()
        files.append(finished(writer, current))
    for record_type, exporter in sorted(registry.exporters.items()):
        writer = _FileWriter(f"{record_type}.jsonl")
        async for record in exporter(user_id):
            chunk = writer.add(record)
            if chunk:
                yield writer.name, chunk
        yield writer.name, writer.finish()
        files.append(
            ExportedFile(
                writer.name, record_type, "component", writer.count, writer.size, writer.sha256
            )
        )
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_us": now_us,
        "created_time": datetime.fromtimestamp(now_us / 1e6, UTC).isoformat(),
        "files": [asdict(f) for f in files],
    }
    yield MANIFEST, json.dumps(manifest, indent=2).encode("utf-8") + b"\n"


def check_member_name(name: str) -> str:
    """A member name as the server sends it; refuses anything that could escape a folder."""
    if not _MEMBER_NAME.match(name):
        raise ValueError(f"unexpected archive member name {name!r}")
    return name


FILE_MODE: Final = 0o600  # an export holds a person's data: readable by its owner only
DIR_MODE: Final = 0o700


class ArchiveExists(FileExistsError):
    """The export's destination already exists; an export never writes over anything."""


async def write_archive(chunks: AsyncIterable[tuple[str, bytes]], out: Path) -> list[str]:
    """Write an export stream to a new .zip file or a new directory; the member names written.

    Never over an existing path (ArchiveExists; an empty directory may be the destination of
    a directory export), private to its owner (files 0600, directories 0700), and whole or not
    at all: written beside `out` under a temporary name, renamed to `out` once complete, and
    removed if the stream fails or the task is cancelled.
    """
    zipped = out.suffix == ".zip"
    await asyncio.to_thread(_check_destination, out, zipped)
    partial = out.with_name(f".{out.name}.partial-{secrets.token_hex(4)}")
    try:
        names = await (_write_zip(chunks, partial) if zipped else _write_dir(chunks, partial))
        os.replace(partial, out)
    except BaseException:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        raise
    return names


def _check_destination(out: Path, zipped: bool) -> None:
    if out.exists() and (zipped or not out.is_dir() or any(out.iterdir())):
        raise ArchiveExists(f"{out} already exists; an export never writes over anything")
    out.parent.mkdir(parents=True, exist_ok=True)


def _make_dir(path: Path) -> None:
    path.mkdir(mode=DIR_MODE)
    os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by the umask


def _create(path: Path) -> BinaryIO:
    """A new file at path, mode 0600 whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return os.fdopen(fd, "wb")


async def _copy_members(
    chunks: AsyncIterable[tuple[str, bytes]], open_member: Callable[[str], IO[bytes]]
) -> list[str]:
    """Write each file's chunks to the member open_member gives for its name, in order."""
    names: list[str] = []
    member = None
    try:
        async for name, chunk in chunks:
            if not names or names[-1] != name:
                if member is not None:
                    member.close()
                names.append(check_member_name(name))
                member = open_member(name)
            assert member is not None
            member.write(chunk)
    finally:
        if member is not None:
            member.close()
    return names


async def _write_zip(chunks: AsyncIterable[tuple[str, bytes]], path: Path) -> list[str]:
    with _create(path) as raw, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        return await _copy_members(chunks, lambda name: zf.open(name, "w", force_zip64=True))


async def _write_dir(chunks: AsyncIterable[tuple[str, bytes]], path: Path) -> list[str]:
    await asyncio.to_thread(_make_dir, path)
    return await _copy_members(chunks, lambda name: _create(path / name))


def read_archive(path: Path) -> dict[str, bytes]:
    """Every member of an archive written by write_archive (a .zip file or a directory);
    ValueError when it is neither."""
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}
    try:
        with zipfile.ZipFile(path) as zf:
            return {name: zf.read(name) for name in zf.namelist()}
    except zipfile.BadZipFile:
        raise ValueError("neither a .zip export nor a directory export") from None


def verify_archive(members: dict[str, bytes]) -> dict[str, Any]:
    """Check every file against the manifest (count, size, SHA-256); returns the manifest."""
    if MANIFEST not in members:
        raise ValueError("archive has no manifest.json")
    manifest: dict[str, Any] = json.loads(members[MANIFEST])
    if manifest.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} archive")
    listed = {f["name"] for f in manifest["files"]}
    extra = set(members) - listed - {MANIFEST}
    if extra:
        raise ValueError(f"files not in the manifest: {sorted(extra)}")
    for f in manifest["files"]:
        data = members.get(f["name"])
        if data is None:
            raise ValueError(f"{f['name']} is listed in the manifest but missing")
        if hashlib.sha256(data).hexdigest() != f["sha256"] or len(data) != f["bytes"]:
            raise ValueError(f"{f['name']} does not match its checksum")
        if data.count(b"\n") != f["count"]:
            raise ValueError(f"{f['name']} has a different record count than the manifest")
    return manifest


def records(members: dict[str, bytes], record_type: str) -> list[dict[str, Any]]:
    """The parsed records of one record type in an archive."""
    data = members.get(f"{record_type}.jsonl", b"")
    return [json.loads(line) for line in data.split(b"\n") if line]

"""Fuzzing every RPC the server serves: no input makes it answer UNKNOWN or leak Python text.

The methods come from the service descriptors of every pulsesync.v1 file plus the gRPC health
service, so a new RPC is fuzzed without anyone adding it here. Each example sends one of: random
bytes; a message of the method's input type built from its descriptor with boundary integers,
boundary and out-of-range timestamps, NaN and infinite floats, very long strings; such a message
with an invalid UTF-8 string field appended or with its bytes mutated. All calls go over a real
authenticated channel to one real server. Afterwards the server is still SERVING and every event
an ingest ack covered is stored, quarantined, or named in that ack as refused for consent.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import descriptor, descriptor_pb2, message, message_factory
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pulsesync.server.app import RunningServer
from pulsesync.server.limits import HeavyReads
from pulsesync.server.rpc.base import error_info
from pulsesync.server.timeline.validate import MAX_EVENT_ID_LENGTH, MAX_SEQ
from pulsesync.v1 import (
    common_pb2,
    devices_pb2,
    events_pb2,
    ingest_pb2,
    nudges_pb2,
    privacy_pb2,
    profiles_pb2,
    timeline_pb2,
)
from tests.support.server import ALL_CONSENTS, PairedDevice, pair_device, start_server

T = TypeVar("T")

FILES: tuple[Any, ...] = (common_pb2, devices_pb2, events_pb2, ingest_pb2, nudges_pb2)
FILES += (privacy_pb2, profiles_pb2, timeline_pb2, health_pb2)
# Methods that cut off or erase their caller are sent from a second person's device (paired
# again whenever it is cut off), so the ingesting device keeps its events and its token.
CUTS_OFF_CALLER = {
    "/pulsesync.v1.DeviceService/RevokeDevice",
    "/pulsesync.v1.DeviceService/RotateDeviceToken",
    "/pulsesync.v1.PrivacyService/EraseData",
}
UPLOADS = {"/pulsesync.v1.IngestService/Upload", "/pulsesync.v1.IngestService/UploadBatch"}
LEAKS = ("Traceback", "Error(", "Exception", 'File "', "pulsesync/", ".py:", '.py"')

INT32: tuple[int, ...] = (0, 1, -1, 2**31 - 1, -(2**31))
INT64: tuple[int, ...] = (*INT32, 2**31, 2**32, 2**53 + 1, 2**63 - 1, -(2**63))
UINT32: tuple[int, ...] = (0, 1, 2**31, 2**32 - 1)
UINT64: tuple[int, ...] = (*UINT32, 2**32, 2**63 - 1, 2**63, 2**64 - 1)
# Timestamp seconds at and beyond the limits of the protobuf Timestamp range.
SECONDS: tuple[int, ...] = (
    0,
    -1,
    2**62,
    -(2**62),
    253402300799,
    253402300800,
    -62135596800,
    -62135596801,
)
SECONDS += (2**63 - 1, -(2**63))
NANOS = (0, 999_999_999, 1_000_000_000, -1, 2**31 - 1, -(2**31))
BAD_UTF8 = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\x80b")

FD = descriptor.FieldDescriptor


@dataclass(frozen=True, slots=True)
class Method:
    path: str
    input: descriptor.Descriptor
    client_stream: bool
    server_stream: bool


def all_methods() -> list[Method]:
    out = []
    for module in FILES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                proto = descriptor_pb2.MethodDescriptorProto()
                m.CopyToProto(proto)
                out.append(
                    Method(
                        f"/{service.full_name}/{m.name}",
                        m.input_type,
                        proto.client_streaming,
                        proto.server_streaming,
                    )
                )
    return sorted(out, key=lambda m: m.path)


METHODS = all_methods()


def _ints(kind: int) -> st.SearchStrategy[int]:
    edges: tuple[int, ...]
    if kind == FD.CPPTYPE_INT32:
        lo, hi, edges = -(2**31), 2**31 - 1, INT32
    elif kind == FD.CPPTYPE_INT64:
        lo, hi, edges = -(2**63), 2**63 - 1, INT64
    elif kind == FD.CPPTYPE_UINT32:
        lo, hi, edges = 0, 2**32 - 1, UINT32
    else:
        lo, hi, edges = 0, 2**64 - 1, UINT64
    return st.sampled_from(edges) | st.integers(lo, hi)


STRINGS = (
    st.text(max_size=40)
    | st.sampled_from(["", " ", "\x00", "../../etc/passwd", "'; DROP TABLE events; --"])
    | st.integers(1_000, 200_000).map(lambda n: "x" * n)
)


def _scalar(data: st.DataObject, f: descriptor.FieldDescriptor) -> Any:
    c = f.cpp_type
    if c in (FD.CPPTYPE_INT32, FD.CPPTYPE_INT64, FD.CPPTYPE_UINT32, FD.CPPTYPE_UINT64):
        return data.draw(_ints(c))
    if c == FD.CPPTYPE_ENUM:
        assert f.enum_type is not None
        known = [v.number for v in f.enum_type.values]
        return data.draw(st.sampled_from(known) | st.sampled_from(INT32))
    if c == FD.CPPTYPE_BOOL:
        return data.draw(st.booleans())
    if c in (FD.CPPTYPE_FLOAT, FD.CPPTYPE_DOUBLE):
        return data.draw(
            st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -0.0])
            | (st.floats(width=32) if c == FD.CPPTYPE_FLOAT else st.floats())
        )
    if f.type == FD.TYPE_BYTES:
        return data.draw(st.binary(max_size=64) | st.sampled_from(BAD_UTF8))
    return data.draw(STRINGS)


def build(data: st.DataObject, d: descriptor.Descriptor, depth: int = 0) -> message.Message:
    """A message of type d with drawn values in a drawn subset of its fields."""
    msg = message_factory.GetMessageClass(d)()
    if d.full_name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        msg.seconds = data.draw(st.sampled_from(SECONDS) | st.integers(-(2**40), 2**40))  # type: ignore[attr-defined]
        msg.nanos = data.draw(st.sampled_from(NANOS) | st.integers(0, 999_999_999))  # type: ignore[attr-defined]
        return msg
    for f in d.fields:
        if not data.draw(st.booleans()):
            continue
        value = getattr(msg, f.name)
        sub = f.message_type
        if sub is not None and sub.GetOptions().map_entry:
            k, v = sub.fields_by_name["key"], sub.fields_by_name["value"]
            for _ in range(data.draw(st.integers(0, 2))):
                key = _scalar(data, k)
                if v.cpp_type == FD.CPPTYPE_MESSAGE:
                    if depth < 3 and v.message_type is not None:
                        value[key].CopyFrom(build(data, v.message_type, depth + 1))
                else:
                    value[key] = _scalar(data, v)
        elif f.is_repeated:
            for _ in range(data.draw(st.integers(0, 3))):
                if sub is not None:
                    if depth < 3:
                        value.add().CopyFrom(build(data, sub, depth + 1))
                else:
                    value.append(_scalar(data, f))
        elif sub is not None:
            if depth < 3:
                value.CopyFrom(build(data, sub, depth + 1))
        else:
            setattr(msg, f.name, _scalar(data, f))
    return msg


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bad_utf8_field(data: st.DataObject, d: descriptor.Descriptor) -> bytes:
    """A string field of d (if any) carrying invalid UTF-8, encoded by hand."""
    strings = [f for f in d.fields if f.type == FD.TYPE_STRING]
    if not strings:
        return b""
    f = data.draw(st.sampled_from(strings))
    raw = data.draw(st.sampled_from(BAD_UTF8))
    return _varint(f.number << 3 | 2) + _varint(len(raw)) + raw


def _valid_event(data: st.DataObject, now_us: int, seqs: st.SearchStrategy[int]) -> bytes:
    """A plausible event (so some are stored), sometimes with drawn fields merged in."""
    ev = events_pb2.Event(event_id=str(uuid.uuid4()), seq=data.draw(seqs))
    ev.device_time.FromMicroseconds(now_us - data.draw(st.integers(0, 10**9)))
    ev.screen_view.app = data.draw(st.text(max_size=10))
    ev.screen_view.screen = "s"
    ev.screen_view.dwell.FromSeconds(data.draw(st.integers(0, 100)))
    if data.draw(st.booleans()):
        ev.MergeFromString(build(data, events_pb2.Event.DESCRIPTOR, 1).SerializeToString())
    return ev.SerializeToString()


def request_bytes(data: st.DataObject, m: Method, now_us: int) -> bytes:
    how = data.draw(st.sampled_from(["random", "built", "bad_utf8", "mutated", "event"]))
    if how == "random":
        return data.draw(st.binary(max_size=256))
    built = build(data, m.input).SerializeToString()
    if how == "bad_utf8":
        return built + _bad_utf8_field(data, m.input)
    if how == "mutated" and built:
        raw = bytearray(built)
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        return bytes(raw[: data.draw(st.integers(0, len(raw)))])
    if how == "event" and m.path in UPLOADS:
        seqs = st.integers(1, 60) | st.sampled_from(UINT64[1:])
        batch = ingest_pb2.EventBatch(batch_id=data.draw(_ints(FD.CPPTYPE_UINT64)))
        batch.sent_time.FromMicroseconds(now_us)
        for _ in range(data.draw(st.integers(1, 4))):
            batch.events.add().MergeFromString(_valid_event(data, now_us, seqs))
        return ingest_pb2.UploadRequest(batch=batch).SerializeToString()
    return built


class ServerThread:
    """One real server on its own event loop, so synchronous hypothesis examples can call it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: RunningServer | None = None
        self._stop: asyncio.Event | None = None

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with start_server(self.tmp) as server:
            # The fuzzer sends heavy reads back to back, far past a device's row budget, whose
            # pacing (tests/server/test_limits.py) would only make each call wait.
            server.app.rpc.heavy_reads = HeavyReads(rows_per_s=1e12, burst_rows=1e12)
            self.server, self.loop = server, asyncio.get_running_loop()
            self.ready.set()
            await self._stop.wait()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        assert self.ready.wait(timeout=120), "server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.loop is not None
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=120)


@dataclass
class Fuzz:
    srv: ServerThread
    channel: grpc.Channel
    ingest: PairedDevice
    other: PairedDevice
    # Per acked upload: (acked_through_seq, accepted_count, seqs sent, seqs refused for consent).
    acked: list[tuple[int, int, list[tuple[int, str]], set[int]]] = field(default_factory=list)
    codes: dict[str, set[str]] = field(default_factory=dict)

    @property
    def server(self) -> RunningServer:
        assert self.srv.server is not None
        return self.srv.server


@pytest.fixture
def fuzz(tmp_path: Path) -> Iterator[Fuzz]:
    with ServerThread(tmp_path) as srv:
        assert srv.server is not None
        ingest = srv.run(pair_device(srv.server, "ada"))
        other = srv.run(pair_device(srv.server, "zed"))
        with grpc.insecure_channel(srv.server.address) as channel:
            yield Fuzz(srv, channel, ingest, other)


def _check_status(path: str, e: grpc.RpcError) -> str:
    code: grpc.StatusCode = e.code()  # type: ignore[attr-defined]
    details: str = e.details() or ""  # type: ignore[attr-defined]
    assert code != grpc.StatusCode.UNKNOWN, (path, details)
    for leak in LEAKS:
        assert leak not in details, (path, code, details)
    return str(code.name)


def _record_ack(f: Fuzz, body: bytes, raw: bytes) -> None:
    ack = ingest_pb2.UploadResponse.FromString(raw)
    sent = [(e.seq, e.event_id) for e in ingest_pb2.UploadRequest.FromString(body).batch.events]
    if ack.HasField("error") or ack.acked_through_seq == 0:
        return
    consent = {
        r.seq for r in ack.rejected if r.reason == ingest_pb2.REJECTION_REASON_CONSENT_NOT_GRANTED
    }
    f.acked.append((ack.acked_through_seq, ack.accepted_count, sent, consent))


def call(f: Fuzz, m: Method, body: bytes) -> str:
    """Send body to m; the status code name it ends with."""
    device = f.other if m.path in CUTS_OFF_CALLER else f.ingest
    md = device.metadata
    try:
        if m.client_stream:
            assert m.server_stream, m.path  # no client-only stream exists yet
            for resp in f.channel.stream_stream(m.path, None, None)(
                iter([body]), metadata=md, timeout=10
            ):
                if m.path == "/pulsesync.v1.IngestService/Upload":
                    _record_ack(f, body, resp)
        elif m.server_stream:
            # Watches never end on their own: an accepted one is cut by the deadline.
            for _ in f.channel.unary_stream(m.path, None, None)(body, metadata=md, timeout=0.5):
                pass
        else:
            resp = f.channel.unary_unary(m.path, None, None)(body, metadata=md, timeout=10)
            if m.path == "/pulsesync.v1.IngestService/UploadBatch":
                ack = ingest_pb2.UploadBatchResponse.FromString(resp).ack
                _record_ack(f, body, ack.SerializeToString())
        code = "OK"
    except grpc.RpcError as e:
        code = _check_status(m.path, e)
    if m.path in CUTS_OFF_CALLER and code == "UNAUTHENTICATED":
        f.other = f.srv.run(pair_device(f.server, f"zed-{uuid.uuid4().hex[:8]}"))
    f.codes.setdefault(m.path, set()).add(code)
    return code


def test_every_service_is_fuzzed() -> None:
    paths = {m.path for m in METHODS}
    assert len(paths) >= 27
    assert "/grpc.health.v1.Health/Check" in paths
    assert any(m.client_stream for m in METHODS)
    assert any(m.server_stream for m in METHODS)


def test_fuzz_every_method(fuzz: Fuzz) -> None:
    now_us = fuzz.server.app.clock.now_us()

    @settings(
        max_examples=600,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def one_request(data: st.DataObject) -> None:
        m = data.draw(st.sampled_from(METHODS))
        call(fuzz, m, request_bytes(data, m, now_us))

    one_request()
    # Then one plain batch of fresh events over seqs 1..200, through the same path, so the
    # accounting below always has events to check: acks are a contiguous watermark, and the
    # fuzzer's scattered seqs alone may never fill the run from 1 that moves it. The fuzzer may
    # have withdrawn consents (SetConsent is among its methods): grant them again first.
    me = fuzz.srv.run(fuzz.server.app.identity.authenticate(fuzz.ingest.token))
    for category in ALL_CONSENTS:
        fuzz.srv.run(fuzz.server.app.consent.set(me.user_id, category, True, device_id="fuzz"))
    batch = ingest_pb2.EventBatch(batch_id=1)
    batch.sent_time.FromMicroseconds(now_us)
    for seq in range(1, 201):
        ev = batch.events.add(event_id=str(uuid.uuid4()), seq=seq)
        ev.device_time.FromMicroseconds(now_us - 1_000_000)
        ev.screen_view.app, ev.screen_view.screen = "fuzz", "s"
    upload = next(m for m in METHODS if m.path == "/pulsesync.v1.IngestService/UploadBatch")
    assert (
        call(fuzz, upload, ingest_pb2.UploadBatchRequest(batch=batch).SerializeToString()) == "OK"
    )
    # Every method was reached (a sampled list of 28 over 600 examples covers all).
    assert set(fuzz.codes) == {m.path for m in METHODS}, sorted(fuzz.codes)

    health = fuzz.channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    # Every event an ack covered is stored or quarantined, unless the ack said consent refused it.
    identity = fuzz.srv.run(fuzz.server.app.identity.authenticate(fuzz.ingest.token))
    pk = identity.device_pk
    db = sqlite3.connect(f"file:{fuzz.server.app.config.database}?mode=ro", uri=True)
    try:
        stored = {s for (s,) in db.execute("SELECT seq FROM events WHERE device_pk = ?", (pk,))}
        held = set(db.execute("SELECT seq, event_id FROM quarantine WHERE device_pk = ?", (pk,)))
    finally:
        db.close()
    assert fuzz.acked, "no upload was acked: the fuzzer never reached ingest's happy path"
    assert sum(accepted for _, accepted, _, _ in fuzz.acked) > 0
    missing = [
        (seq, through)
        for through, _, sent, consent in fuzz.acked
        for seq, event_id in sent
        if seq <= through
        and seq not in stored | consent
        # A seq beyond SQLite's range is quarantined (SEQ_TOO_LARGE) under the largest one,
        # an overlong event id (EVENT_ID_TOO_LONG) under its first characters.
        and (min(seq, MAX_SEQ), event_id[:MAX_EVENT_ID_LENGTH]) not in held
    ]
    assert missing == []


async def test_unimplemented_library_method_is_unimplemented_not_unknown(
    server: RunningServer,
) -> None:
    """The health library leaves Health/List unimplemented: the caller gets UNIMPLEMENTED with
    a reason, not UNKNOWN with the library's exception text."""
    device = await pair_device(server, "ada")
    async with grpc.aio.insecure_channel(server.address) as ch:
        stub = ch.unary_unary("/grpc.health.v1.Health/List", None, None)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub(b"", metadata=device.metadata, timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED, e.value.details()
    info = error_info(e.value)
    assert info is not None
    assert info.reason == "NOT_YET_AVAILABLE"
    assert "NotImplementedError" not in (e.value.details() or "")

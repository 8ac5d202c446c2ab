"""No RPC lets one person's device read or change another person's data.

Every method of every pulsesync.v1 service is called from user A's device with a request that
names user B's things wherever a request can name something (ids, device filters, wide time
ranges). The methods are found from the service descriptors, so a new RPC is probed without
anyone remembering to add it here. Afterwards nothing of B may appear in any response, and
B's data must be exactly as before. Revoked and missing tokens are refused by every method.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message, message_factory

from pulsesync.server.app import RunningServer
from pulsesync.server.clock import FakeClock
from pulsesync.v1 import (
    common_pb2,
    devices_pb2,
    devices_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    nudges_pb2,
    privacy_pb2,
    privacy_pb2_grpc,
    profiles_pb2,
    profiles_pb2_grpc,
    timeline_pb2,
    timeline_pb2_grpc,
)
from tests.support.server import PairedDevice, pair_device, start_server

FILES = (devices_pb2, ingest_pb2, timeline_pb2, profiles_pb2, nudges_pb2, privacy_pb2)
# Methods that destroy or cut off the caller run last, so the others see a live caller.
LAST = ("pulsesync.v1.DeviceService/RevokeDevice", "pulsesync.v1.PrivacyService/EraseData")
PUBLIC = {"pulsesync.v1.DeviceService/PairDevice"}
B_NAME = "bea-7f3a91"
B_SCREEN = "B-SECRET-SCREEN-51c2"
B_THEME = "B-SECRET-THEME-0d9e"


def methods() -> Iterator[descriptor.MethodDescriptor]:
    """Every RPC of the v1 API, destructive ones last."""
    found = [
        m
        for f in FILES
        for service in f.DESCRIPTOR.services_by_name.values()
        for m in service.methods
    ]
    return iter(
        sorted(
            found, key=lambda m: (_path(m) in LAST, LAST.index(_path(m)) if _path(m) in LAST else 0)
        )
    )


def _path(m: descriptor.MethodDescriptor) -> str:
    return f"/{m.containing_service.full_name}/{m.name}"[1:]


def _cls(d: descriptor.Descriptor) -> type[message.Message]:
    return message_factory.GetMessageClass(d)


@dataclass(slots=True)
class World:
    server: RunningServer
    a: PairedDevice
    b_phone: PairedDevice
    b_desktop: PairedDevice
    b_event_ids: list[str]


def test_no_request_names_a_user() -> None:
    """The acting user comes from the token: no request field (at any depth) names a user."""

    def walk(d: descriptor.Descriptor, seen: set[str]) -> Iterator[str]:
        if d.full_name in seen:
            return
        seen.add(d.full_name)
        for f in d.fields:
            yield f"{d.full_name}.{f.name}"
            if f.message_type is not None and not f.message_type.full_name.startswith("google."):
                yield from walk(f.message_type, seen)

    offenders = [
        name
        for m in methods()
        for name in walk(m.input_type, set())
        if name.rsplit(".", 1)[1] in {"user", "user_id", "user_name", "owner"}
    ]
    assert offenders == []


async def _seed_b(server: RunningServer) -> World:
    a = await pair_device(server, "al", kind=common_pb2.DEVICE_KIND_PHONE)
    b_phone = await pair_device(server, B_NAME, kind=common_pb2.DEVICE_KIND_PHONE)
    b_desktop = await pair_device(server, B_NAME, kind=common_pb2.DEVICE_KIND_DESKTOP)
    now = server.app.clock.now_us()
    batch = ingest_pb2.EventBatch(batch_id=1)
    batch.sent_time.FromMicroseconds(now)
    ids = []
    for seq in range(1, 6):
        ev = batch.events.add(event_id=str(uuid.uuid4()), seq=seq)
        ev.device_time.FromMicroseconds(now - (10 - seq) * 1_000_000)
        ev.screen_view.app, ev.screen_view.screen = "b-app", B_SCREEN
        ev.screen_view.dwell.FromSeconds(3)
        ids.append(ev.event_id)
    async with grpc.aio.insecure_channel(server.address) as ch:
        ack = await ingest_pb2_grpc.IngestServiceStub(ch).UploadBatch(
            ingest_pb2.UploadBatchRequest(batch=batch), metadata=b_phone.metadata, timeout=5
        )
        assert ack.ack.accepted_count == 5
        req = profiles_pb2.UpdateProfileRequest(base_version=0)
        req.profile.preferences.theme = B_THEME
        req.edits.add(
            field_path="preferences.theme",
            stamp=profiles_pb2.HybridTimestamp(
                wall_time_ms=now // 1000, logical=0, node_id=b_phone.device_id
            ),
        )
        await profiles_pb2_grpc.ProfileServiceStub(ch).UpdateProfile(
            req, metadata=b_phone.metadata, timeout=5
        )
    return World(server, a, b_phone, b_desktop, ids)


def _fill(msg: message.Message, w: World, now_us: int) -> None:
    """Point every nameable field of a request at B's things (or at everything)."""
    for f in msg.DESCRIPTOR.fields:
        name = f.name
        repeated = f.is_repeated
        if f.message_type is not None and f.message_type.full_name == "google.protobuf.Timestamp":
            if not repeated:
                t = getattr(msg, name)
                t.FromMicroseconds(0 if "start" in name else now_us + 86_400_000_000)
        elif f.type == descriptor.FieldDescriptor.TYPE_STRING:
            value = {
                "device_id": w.b_phone.device_id,
                "confirmation": "ERASE",
            }.get(name.removesuffix("s"), w.b_event_ids[0] if name.endswith("_id") else "")
            if name == "device_ids":
                getattr(msg, name).extend([w.b_phone.device_id, w.b_desktop.device_id])
            elif not repeated and value:
                setattr(msg, name, value)


def _b_markers(w: World) -> list[bytes]:
    return [
        s.encode()
        for s in (
            B_NAME,
            B_SCREEN,
            B_THEME,
            w.b_phone.device_id,
            w.b_desktop.device_id,
            *w.b_event_ids,
        )
    ]


async def _call(
    ch: grpc.aio.Channel, m: descriptor.MethodDescriptor, req: message.Message, md: Any
) -> tuple[list[bytes], grpc.StatusCode]:
    """Call a method generically; the serialized responses and the final status code."""
    path = "/" + _path(m)
    out_cls = _cls(m.output_type)
    ser, de = (lambda x: x.SerializeToString()), out_cls.FromString
    got: list[bytes] = []
    try:
        if not m.client_streaming and not m.server_streaming:
            resp = await ch.unary_unary(path, ser, de)(req, metadata=md, timeout=5)
            got.append(resp.SerializeToString())
        elif m.server_streaming and not m.client_streaming:
            call = ch.unary_stream(path, ser, de)(req, metadata=md, timeout=10)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # watch streams stay open: read what comes
                    async for item in call:
                        got.append(item.SerializeToString())
            call.cancel()
        else:
            bidi: Any = ch.stream_stream(path, ser, de)(metadata=md, timeout=10)  # type: ignore[call-arg]
            await bidi.write(req)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    got.append((await bidi.read()).SerializeToString())
            await bidi.done_writing()
            bidi.cancel()
    except grpc.aio.AioRpcError as e:
        return got, e.code()
    return got, grpc.StatusCode.OK


def _request(m: descriptor.MethodDescriptor, w: World, now_us: int) -> message.Message:
    req = _cls(m.input_type)()
    if (
        m.input_type.full_name == "pulsesync.v1.UploadRequest"
        or m.input_type.full_name == "pulsesync.v1.UploadBatchRequest"
    ):
        # A's own upload: it must land in A's timeline only.
        batch = req.batch  # type: ignore[attr-defined]
        batch.batch_id = 1
        batch.sent_time.FromMicroseconds(now_us)
        ev = batch.events.add(event_id=str(uuid.uuid4()), seq=1 + hash(m.name) % 1000)
        ev.device_time.FromMicroseconds(now_us - 1_000_000)
        ev.tap.app, ev.tap.screen, ev.tap.target = "a-app", "home", "go"
        return req
    _fill(req, w, now_us)
    return req


async def test_a_device_never_sees_or_changes_another_persons_data(tmp_path: Path) -> None:
    async with start_server(tmp_path, clock=FakeClock()) as server:
        w = await _seed_b(server)
        now = server.app.clock.now_us()
        markers = _b_markers(w)
        probed = []
        async with grpc.aio.insecure_channel(server.address) as ch:
            for m in methods():
                if _path(m) in PUBLIC:
                    continue
                got, code = await _call(ch, m, _request(m, w, now), w.a.metadata)
                probed.append(_path(m))
                for blob in got:
                    leaked = [mk for mk in markers if mk in blob]
                    assert leaked == [], f"{_path(m)} returned B's {leaked}"
                assert code in {
                    grpc.StatusCode.OK,
                    grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.CANCELLED,
                }, f"{_path(m)} answered {code}"

            # B is exactly as before: devices, events, profile, consents.
            b = w.b_phone.metadata
            devices = await devices_pb2_grpc.DeviceServiceStub(ch).ListDevices(
                devices_pb2.ListDevicesRequest(), metadata=b, timeout=5
            )
            assert {d.device_id for d in devices.devices if not d.HasField("revoke_time")} == {
                w.b_phone.device_id,
                w.b_desktop.device_id,
            }
            req = timeline_pb2.ListEventsRequest(page_size=1000)
            req.start_time.FromMicroseconds(0)
            req.end_time.FromMicroseconds(now + 86_400_000_000)
            events = await timeline_pb2_grpc.TimelineServiceStub(ch).ListEvents(
                req, metadata=b, timeout=5
            )
            assert sorted(e.event.event_id for e in events.events) == sorted(w.b_event_ids)
            profile = await profiles_pb2_grpc.ProfileServiceStub(ch).GetProfile(
                profiles_pb2.GetProfileRequest(), metadata=b, timeout=5
            )
            assert profile.profile.preferences.theme == B_THEME
            consents = await privacy_pb2_grpc.PrivacyServiceStub(ch).GetConsents(
                privacy_pb2.GetConsentsRequest(), metadata=b, timeout=5
            )
            assert all(c.granted for c in consents.consents)
        every = {_path(m) for m in methods()} - PUBLIC
        assert set(probed) == every


@pytest.mark.parametrize("credential", ["revoked", "missing", "unknown"])
async def test_every_method_refuses_a_bad_token(tmp_path: Path, credential: str) -> None:
    async with start_server(tmp_path) as server:
        phone = await pair_device(server, "al")
        spare = await pair_device(server, "al", kind=common_pb2.DEVICE_KIND_DESKTOP)
        async with grpc.aio.insecure_channel(server.address) as ch:
            await devices_pb2_grpc.DeviceServiceStub(ch).RevokeDevice(
                devices_pb2.RevokeDeviceRequest(device_id=spare.device_id),
                metadata=phone.metadata,
                timeout=5,
            )
            md = {
                "revoked": spare.metadata,
                "missing": (),
                "unknown": (("authorization", "Bearer pst_not-a-real-token"),),
            }[credential]
            for m in methods():
                if _path(m) in PUBLIC:
                    continue
                _, code = await _call(ch, m, _cls(m.input_type)(), md)
                assert code == grpc.StatusCode.UNAUTHENTICATED, f"{_path(m)} answered {code}"

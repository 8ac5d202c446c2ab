"""AIP-155 request_id: every mutating RPC takes one, and a retry gets the first answer.

Against a real server: PairDevice's lost response (the retry returns the same token, one
device), CreatePairingCode and RotateDeviceToken retried, a reused id with another request,
a malformed id, the window's expiry, per-device scope, answers sealed at rest and erased
with the person. The engine's own guarantees (one effect under concurrent retries, a call whose
client went away still answers its retry) are checked on a real database.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from pulsesync.server.app import SERVICES, RunningServer
from pulsesync.server.clock import FakeClock
from pulsesync.server.idempotency import WINDOW_US, Idempotency, request_id_in
from pulsesync.server.rpc.base import error_info
from pulsesync.server.rpc.devices import DeviceServicer
from pulsesync.server.rpc.ingest import IngestServicer
from pulsesync.server.rpc.nudges import NudgeServicer
from pulsesync.server.rpc.privacy import PrivacyServicer
from pulsesync.server.rpc.profiles import ProfileServicer
from pulsesync.server.rpc.timeline import TimelineServicer
from pulsesync.server.storage.db import Database
from pulsesync.server.storage.sqlite.idempotency import SqliteIdempotencyStorage
from pulsesync.v1 import (
    common_pb2,
    devices_pb2,
    devices_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    privacy_pb2,
    privacy_pb2_grpc,
    profiles_pb2,
    profiles_pb2_grpc,
)
from tests.server.timeline.events import batch, heart_rate
from tests.support.server import pair_device, start_server

# Methods that only read: no request_id (a retry of a read is harmless by itself).
READ_PREFIXES = ("Get", "List", "Watch", "Subscribe", "Summarize", "Export")
# Mutating methods without a request_id, and why.
EXEMPT = {
    # A bidi stream: each batch is deduplicated by (device, seq) and acked with a contiguous
    # watermark, which is what makes its retries safe.
    "pulsesync.v1.IngestService.Upload": "stream; deduplicated by sequence number",
    # After erasure the device's credential no longer exists, so no retry can be matched to
    # its caller; the retry's USER_ERASED is itself the answer that the erasure happened.
    "pulsesync.v1.PrivacyService.EraseData": "the retry is refused with USER_ERASED",
}


def _services() -> list[Any]:
    pool = descriptor_pool.Default()
    return [pool.FindServiceByName(name) for *_, name in SERVICES]


def test_every_mutating_rpc_has_a_request_id_and_applies_it() -> None:
    servicers: dict[str, Any] = {
        cls.__mro__[1].__name__.removesuffix("Servicer"): cls
        for cls in (DeviceServicer, IngestServicer, TimelineServicer, ProfileServicer,
                    NudgeServicer, PrivacyServicer)
    }  # fmt: skip
    servicers = {f"pulsesync.v1.{short}": cls for short, cls in servicers.items()}
    mutating = []
    for service in _services():
        for method in service.methods:
            fields = method.input_type.fields_by_name
            impl = getattr(servicers[service.full_name], method.name)
            if method.name.startswith(READ_PREFIXES):
                assert "request_id" not in fields, method.full_name
                assert getattr(impl, "idempotent", None) is None, method.full_name
                continue
            if method.full_name in EXEMPT:
                assert "request_id" not in fields, method.full_name
                continue
            mutating.append(method.name)
            field = fields.get("request_id")
            assert field is not None, f"{method.full_name} mutates but has no request_id"
            assert field.type == field.TYPE_STRING, method.full_name
            assert not method.client_streaming
            assert not method.server_streaming
            assert getattr(impl, "idempotent", None) is not None, (
                f"{method.full_name} has a request_id its servicer ignores"
            )
    assert {"PairDevice", "UpdateProfile", "UpdateConsent", "RecordNudgeFeedback"} <= set(mutating)
    assert len(mutating) >= 10


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def srv(tmp_path: Path, clock: FakeClock):  # type: ignore[no-untyped-def]
    async with start_server(tmp_path, clock=clock) as running:
        yield running


def _rid() -> str:
    return str(uuid.uuid4())


async def _records(srv: RunningServer, user_id: int | None = None) -> int:
    sql = "SELECT count(*) FROM idempotency_records"
    args: tuple[Any, ...] = ()
    if user_id is not None:
        sql, args = sql + " WHERE user_id = ?", (user_id,)
    async with srv.app.db.reader.execute(sql, args) as c:
        row = await c.fetchone()
    assert row is not None
    return int(row[0])


async def test_a_lost_pairing_response_is_recovered_by_retrying(srv: RunningServer) -> None:
    ids = srv.app.identity
    user_id = await ids.add_user("ada")
    code, _ = await ids.create_pairing_code(user_id)
    request = devices_pb2.PairDeviceRequest(
        pairing_code=code, device_name="ada's phone", kind=common_pb2.DEVICE_KIND_PHONE,
        request_id=_rid(),
    )  # fmt: skip
    async with grpc.aio.insecure_channel(srv.address) as ch:
        stub = devices_pb2_grpc.DeviceServiceStub(ch)
        first = await stub.PairDevice(request, timeout=10)
        # The response is lost; the app sends the very same request again.
        again = await stub.PairDevice(request, timeout=10)
        assert again == first
        assert first.token
        me = await stub.GetCurrentDevice(
            devices_pb2.GetCurrentDeviceRequest(),
            metadata=(("authorization", f"Bearer {again.token}"),),
            timeout=10,
        )
        assert me.device.device_id == first.device.device_id
        listed = await stub.ListDevices(
            devices_pb2.ListDevicesRequest(),
            metadata=(("authorization", f"Bearer {again.token}"),),
            timeout=10,
        )
        assert len(listed.devices) == 1  # one effect
        # Without the request_id the used code is refused, as before.
        bare = devices_pb2.PairDeviceRequest()
        bare.CopyFrom(request)
        bare.request_id = ""
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.PairDevice(bare, timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # The same id with a different request is refused, not answered with the token.
        other = devices_pb2.PairDeviceRequest()
        other.CopyFrom(request)
        other.device_name = "someone else's phone"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.PairDevice(other, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info(err.value)
        assert info is not None
        assert info.reason == "REQUEST_ID_REUSED"
    # The answer is held for the person (erasure removes it), and sealed: the token is
    # nowhere in the database file.
    assert await _records(srv, user_id) == 1
    await srv.app.db.writer.execute("PRAGMA wal_checkpoint(FULL)")
    raw = b"".join(p.read_bytes() for p in srv.app.db.path.parent.glob(srv.app.db.path.name + "*"))
    assert first.token.encode() not in raw
    assert first.device.device_id.encode() in raw  # the search itself can find plain text


async def test_retries_return_the_first_answer_within_the_window(
    srv: RunningServer, clock: FakeClock
) -> None:
    phone = await pair_device(srv, "bo")
    laptop = await pair_device(srv, "bo", kind=common_pb2.DEVICE_KIND_DESKTOP)
    rid = _rid()
    async with grpc.aio.insecure_channel(srv.address) as ch:
        stub = devices_pb2_grpc.DeviceServiceStub(ch)

        async def mint(device: Any, request_id: str) -> str:
            resp = await stub.CreatePairingCode(
                devices_pb2.CreatePairingCodeRequest(request_id=request_id),
                metadata=device.metadata,
                timeout=10,
            )
            return str(resp.pairing_code)

        first = await mint(phone, rid)
        assert await mint(phone, rid) == first
        assert await mint(phone, rid.upper()) == first  # the same UUID, however written
        assert await mint(phone, "") != first  # no request_id: a new call each time
        assert await mint(phone, _rid()) != first
        assert await mint(laptop, rid) != first  # scoped by device
        clock.advance(WINDOW_US / 1_000_000 - 60)
        assert await mint(phone, rid) == first
        clock.advance(120)
        assert await mint(phone, rid) != first  # the window has passed: carried out again

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mint(phone, "not-a-uuid")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info(err.value)
        assert info is not None
        assert info.reason == "INVALID_REQUEST_ID"

        # A reused id on another method is a different call (the handle includes it).
        revoked = await stub.RevokeDevice(
            devices_pb2.RevokeDeviceRequest(device_id=laptop.device_id, request_id=rid),
            metadata=phone.metadata,
            timeout=10,
        )
        assert revoked.device.revoke_time.ToMicroseconds() > 0
        again = await stub.RevokeDevice(
            devices_pb2.RevokeDeviceRequest(device_id=laptop.device_id, request_id=rid),
            metadata=phone.metadata,
            timeout=10,
        )
        assert again == revoked


async def test_a_lost_rotation_response_returns_the_same_new_token(
    srv: RunningServer, clock: FakeClock
) -> None:
    phone = await pair_device(srv, "cy")
    rid = _rid()
    async with grpc.aio.insecure_channel(srv.address) as ch:
        stub = devices_pb2_grpc.DeviceServiceStub(ch)
        req = devices_pb2.RotateDeviceTokenRequest(request_id=rid)
        first = await stub.RotateDeviceToken(req, metadata=phone.metadata, timeout=10)
        clock.advance(30)
        # Retried with the token the device still holds (valid for the grace period).
        again = await stub.RotateDeviceToken(req, metadata=phone.metadata, timeout=10)
        assert again == first
        me = await stub.GetCurrentDevice(
            devices_pb2.GetCurrentDeviceRequest(),
            metadata=(("authorization", f"Bearer {first.token}"),),
            timeout=10,
        )
        assert me.device.device_id == phone.device_id


async def test_consent_retry_and_erasure_removes_the_answers(
    srv: RunningServer, clock: FakeClock
) -> None:
    phone = await pair_device(srv, "dee")
    user_id = await srv.app.identity.user_id_by_name("dee")
    async with grpc.aio.insecure_channel(srv.address) as ch:
        stub = privacy_pb2_grpc.PrivacyServiceStub(ch)
        req = privacy_pb2.UpdateConsentRequest(
            category=common_pb2.CONSENT_CATEGORY_SYNC, granted=False, policy_version="v2",
            request_id=_rid(),
        )  # fmt: skip
        first = await stub.UpdateConsent(req, metadata=phone.metadata, timeout=10)
        clock.advance(5)
        again = await stub.UpdateConsent(req, metadata=phone.metadata, timeout=10)
        assert again == first  # the first update's time: no second change was recorded
        assert await _records(srv, user_id) == 1
        # Export and the summary see which answers are kept, never the derived secrets.
        table = {t.name: t for t in await srv.app.storage.privacy.user_tables()}[
            "idempotency_records"
        ]
        exported = {c.name for c in table.exported_columns}
        assert exported == {"user_id", "method", "create_us", "expire_us"}
        await stub.EraseData(
            privacy_pb2.EraseDataRequest(confirmation="ERASE"), metadata=phone.metadata, timeout=30
        )
    assert await _records(srv, user_id) == 0


async def test_a_retried_profile_update_gets_the_first_answer(
    srv: RunningServer, clock: FakeClock
) -> None:
    phone = await pair_device(srv, "fay")
    stamp = profiles_pb2.HybridTimestamp(
        wall_time_ms=clock.now_us() // 1000, logical=0, node_id=phone.device_id
    )
    req = profiles_pb2.UpdateProfileRequest(
        base_version=0,
        profile=profiles_pb2.Profile(preferences=profiles_pb2.Preferences(theme="dark")),
        edits=[profiles_pb2.ProfileEdit(field_path="preferences.theme", stamp=stamp)],
        request_id=_rid(),
    )
    async with grpc.aio.insecure_channel(srv.address) as ch:
        stub = profiles_pb2_grpc.ProfileServiceStub(ch)
        first = await stub.UpdateProfile(req, metadata=phone.metadata, timeout=10)
        again = await stub.UpdateProfile(req, metadata=phone.metadata, timeout=10)
        req.request_id = ""
        plain = await stub.UpdateProfile(req, metadata=phone.metadata, timeout=10)
    assert first.committed
    assert first.profile.version == 1
    assert again == first
    assert not plain.committed  # the same edits without a request_id: merged, no new version
    assert plain.profile.version == 1


async def test_a_retried_upload_batch_gets_its_first_ack(
    srv: RunningServer, clock: FakeClock
) -> None:
    """The request reaches UploadBatch as bytes; the request_id still applies."""
    phone = await pair_device(srv, "eve")
    now = clock.now_us()
    req = ingest_pb2.UploadBatchRequest(
        batch=batch(1, now, [heart_rate(1, now - 1_000_000)]), request_id=_rid()
    )
    async with grpc.aio.insecure_channel(srv.address) as ch:
        stub = ingest_pb2_grpc.IngestServiceStub(ch)
        first = await stub.UploadBatch(req, metadata=phone.metadata, timeout=10)
        again = await stub.UploadBatch(req, metadata=phone.metadata, timeout=10)
        req.request_id = ""
        plain = await stub.UploadBatch(req, metadata=phone.metadata, timeout=10)
    assert (first.ack.accepted_count, first.ack.acked_through_seq) == (1, 1)
    assert again == first  # not "0 accepted, 1 duplicate"
    assert (plain.ack.accepted_count, plain.ack.duplicate_count) == (0, 1)


# -- the engine on a real database ------------------------------------------------------------


@pytest.fixture
async def engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with await Database.open(tmp_path / "db.sqlite") as db:
        yield Idempotency(SqliteIdempotencyStorage(db), FakeClock())


def _pair_request(rid: str) -> devices_pb2.PairDeviceRequest:
    return devices_pb2.PairDeviceRequest(pairing_code="K7QFM2XD", device_name="x", request_id=rid)


async def test_concurrent_retries_take_effect_once(engine: Idempotency) -> None:
    effects = 0
    started, release = asyncio.Event(), asyncio.Event()

    async def call() -> devices_pb2.PairDeviceResponse:
        nonlocal effects
        effects += 1
        started.set()
        await release.wait()
        return devices_pb2.PairDeviceResponse(token=f"t{effects}")

    async def owner(_: object) -> int | None:
        return None

    req = _pair_request(_rid())
    runs = [
        asyncio.ensure_future(
            engine.run(
                method="DeviceService.PairDevice",
                scope="s",
                request=req,
                response_type=devices_pb2.PairDeviceResponse,
                call=call,
                owner=owner,
            )
        )
        for _ in range(3)
    ]
    await started.wait()
    for _ in range(10):  # let the other two reach the handle's lock while the first runs
        await asyncio.sleep(0)
    release.set()
    answers = await asyncio.gather(*runs)
    assert effects == 1
    assert [a.token for a in answers] == ["t1"] * 3


async def test_a_call_whose_client_left_still_answers_the_retry(engine: Idempotency) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    effects = 0

    async def call() -> devices_pb2.PairDeviceResponse:
        nonlocal effects
        effects += 1
        started.set()
        await release.wait()
        return devices_pb2.PairDeviceResponse(token="first")

    async def owner(_: object) -> int | None:
        return None

    req = _pair_request(_rid())
    kwargs: dict[str, Any] = dict(
        method="DeviceService.PairDevice", scope="s", request=req,
        response_type=devices_pb2.PairDeviceResponse, owner=owner,
    )  # fmt: skip
    gone = asyncio.ensure_future(engine.run(call=call, **kwargs))
    await started.wait()
    gone.cancel()  # the client's deadline passed while the call was being carried out
    with pytest.raises(asyncio.CancelledError):
        await gone
    release.set()
    retry = await engine.run(call=call, **kwargs)
    assert retry.token == "first"
    assert effects == 1
    await engine.drain()


async def test_drain_cancels_a_call_that_does_not_finish(engine: Idempotency) -> None:
    started = asyncio.Event()

    async def stuck() -> devices_pb2.PairDeviceResponse:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def owner(_: object) -> int | None:
        return None

    gone = asyncio.ensure_future(
        engine.run(
            method="DeviceService.PairDevice",
            scope="s",
            request=_pair_request(_rid()),
            response_type=devices_pb2.PairDeviceResponse,
            call=stuck,
            owner=owner,
        )
    )
    await started.wait()
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    await asyncio.wait_for(engine.drain(timeout_s=0.05), 60)  # returns instead of hanging


@settings(max_examples=200, deadline=None)
@given(
    request_id=st.text(max_size=40),
    batch_id=st.integers(min_value=0, max_value=2**64 - 1),
    seqs=st.lists(st.integers(min_value=1, max_value=2**63 - 1), max_size=5),
    before=st.booleans(),
)
def test_the_request_id_is_found_in_request_bytes_without_parsing_the_batch(
    request_id: str, batch_id: int, seqs: list[int], before: bool
) -> None:
    batch = ingest_pb2.EventBatch(batch_id=batch_id, events=[heart_rate(s, 0) for s in seqs])
    if before:  # protobuf accepts fields in any order; the last occurrence of a field wins
        raw = ingest_pb2.UploadBatchRequest(request_id="x").SerializeToString()
        raw += ingest_pb2.UploadBatchRequest(batch=batch, request_id=request_id).SerializeToString()
    else:
        raw = ingest_pb2.UploadBatchRequest(batch=batch, request_id=request_id).SerializeToString()
    expected = request_id or ("x" if before else "")  # an empty string is not on the wire
    assert ingest_pb2.UploadBatchRequest.FromString(raw).request_id == expected
    assert request_id_in(raw, 2) == expected


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64))
def test_request_bytes_that_do_not_parse_give_no_request_id_and_no_error(raw: bytes) -> None:
    found = request_id_in(raw, 2)
    try:
        parsed = ingest_pb2.UploadBatchRequest.FromString(raw)
    except DecodeError:
        return
    if found:
        assert parsed.request_id == found

"""AIP-158 on every List method of every service, discovered from the descriptors.

Against a real server over gRPC: page_size is clamped (never refused for being large),
negative is INVALID_ARGUMENT, tokens are opaque and signed (a hand-made or altered one is
refused), bound to the query (reused with other parameters: PAGE_TOKEN_QUERY_MISMATCH) and
to the caller (another person's token is refused), and paging visits every item once.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor

import pulsesync.v1 as v1
from pulsesync.server.app import RunningServer, running_server
from pulsesync.server.clock import FakeClock
from pulsesync.server.config import NudgeConfig, ServerConfig
from pulsesync.server.rpc.base import error_info
from pulsesync.v1 import (
    devices_pb2,
    ingest_pb2,
    nudges_pb2,
    privacy_pb2,
    profiles_pb2,
    timeline_pb2,
)
from tests.server.nudges.support import device_pk_of
from tests.server.timeline.events import batch, heart_rate, ts, upload
from tests.support.server import PairedDevice, pair_device

MIN = 60_000_000
NOON = 1_767_268_800_000_000  # 2026-01-01T12:00Z
MODULES = (devices_pb2, ingest_pb2, nudges_pb2, privacy_pb2, profiles_pb2, timeline_pb2)


def _unary_lists() -> list[MethodDescriptor]:
    return [
        m
        for module in MODULES
        for service in module.DESCRIPTOR.services_by_name.values()
        for m in service.methods
        if m.name.startswith("List") and not m.server_streaming
    ]


def list_methods() -> list[MethodDescriptor]:
    """Every unary List* RPC that pages (AIP-158: its request has a page_token)."""
    return [m for m in _unary_lists() if "page_token" in m.input_type.fields_by_name]


def test_a_list_method_without_page_token_is_a_change_feed() -> None:
    """A List* RPC that does not page is a change feed: it resumes from a sync_token instead."""
    for m in _unary_lists():
        fields = m.input_type.fields_by_name
        assert "page_token" in fields or "sync_token" in fields, m.full_name


@dataclass(frozen=True)
class Spec:
    """How to ask for a listing, and a different query for the token-binding check."""

    fields: Callable[[], dict[str, Any]]
    other_query: Callable[[], dict[str, Any]] | None  # None: the method has no parameters


SPECS: dict[str, Spec] = {
    "ListEvents": Spec(
        lambda: {"start_time": ts(NOON - 60 * MIN), "end_time": ts(NOON + MIN)},
        lambda: {"start_time": ts(NOON - 61 * MIN), "end_time": ts(NOON + MIN)},
    ),
    "ListNudges": Spec(
        lambda: {},
        lambda: {"start_time": ts(NOON - 60 * MIN)},
    ),
    "ListDevices": Spec(lambda: {}, None),
}


def test_every_list_method_has_a_spec() -> None:
    names = {m.name for m in list_methods()}
    assert {"ListEvents", "ListNudges", "ListDevices"} <= names
    assert names == set(SPECS), "describe each new List method in SPECS"


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, PairedDevice, PairedDevice]]:
    config = ServerConfig(port=0, data_dir=tmp_path, grace_seconds=0.5,
                          nudges=NudgeConfig(scheduler="manual"))  # fmt: skip
    async with running_server(config, clock=FakeClock(NOON)) as srv:
        ada = await pair_device(srv, "ada")
        for _ in range(2):
            await pair_device(srv, "ada")
        bo = await pair_device(srv, "bo")
        async with grpc.aio.insecure_channel(srv.address) as ch:
            events = [heart_rate(i, NOON - i * MIN) for i in range(1, 6)]
            await upload(ch, ada.metadata, [batch(1, NOON, events)])
            await upload(ch, bo.metadata, [batch(1, NOON, [heart_rate(1, NOON - MIN)])])
        for dev in (ada, bo):
            pk, uid = await device_pk_of(srv, dev.device_id)
            async with srv.app.db.transaction() as tx:
                for k in range(5):
                    await tx.execute(
                        "INSERT INTO nudges (nudge_id, user_id, decision_id, nudge_type, device_pk, title,"
                        " message, data, probability, reasons, create_us, expire_us, state, outcome_metric)"
                        " VALUES (?, ?, 0, 'walking_suggestion', ?, 't', 'm', '{}', 0.5, '[]', ?, ?,"
                        " 'delivered', 'steps_30m')",
                        (f"ndg_{dev.device_id}_{k}", uid, pk, NOON - k * MIN, NOON + 20 * MIN),
                    )
        yield srv, ada, bo


def _call(ch: grpc.aio.Channel, m: MethodDescriptor) -> tuple[Any, Any]:
    req_cls = message_factory.GetMessageClass(m.input_type)
    resp_cls = message_factory.GetMessageClass(m.output_type)
    fn = ch.unary_unary(
        f"/{m.containing_service.full_name}/{m.name}",
        request_serializer=req_cls.SerializeToString,
        response_deserializer=resp_cls.FromString,
    )
    return fn, req_cls


def _items(resp: Any) -> list[bytes]:
    (field,) = [f for f in resp.DESCRIPTOR.fields if f.is_repeated]
    return [item.SerializeToString() for item in getattr(resp, field.name)]


async def _refused(fn: Any, req: Any, dev: PairedDevice, reason: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fn(req, metadata=dev.metadata, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(err.value)
    assert info is not None
    assert info.reason == reason, (info, err.value.details())
    return err.value.details() or ""


@pytest.mark.parametrize("method", list_methods(), ids=lambda m: m.name)
async def test_list_method_follows_aip_158(
    world: tuple[RunningServer, PairedDevice, PairedDevice], method: MethodDescriptor
) -> None:
    srv, ada, bo = world
    spec = SPECS[method.name]
    async with grpc.aio.insecure_channel(srv.address) as ch:
        fn, req_cls = _call(ch, method)
        everything = await fn(
            req_cls(page_size=1_000_000, **spec.fields()), metadata=ada.metadata, timeout=10
        )
        all_items = _items(everything)  # a huge page_size is clamped, not refused
        assert len(all_items) >= 3
        assert not everything.next_page_token
        await _refused(fn, req_cls(page_size=-1, **spec.fields()), ada, "INVALID_PAGE_SIZE")
        # Page by one: every item once, in the same order; tokens reveal nothing.
        seen: list[bytes] = []
        token, first_token = "", ""
        for _ in range(len(all_items) + 2):
            resp = await fn(
                req_cls(page_size=1, page_token=token, **spec.fields()),
                metadata=ada.metadata,
                timeout=10,
            )
            seen += _items(resp)
            token = resp.next_page_token
            first_token = first_token or token
            if not token:
                break
        assert seen == all_items
        raw = base64.urlsafe_b64decode(first_token + "=" * (-len(first_token) % 4))
        assert ada.device_id.encode() not in raw
        assert b"ndg_" not in raw
        # Hand-made and altered tokens are refused.
        for forged in (
            "123:ndg_x",
            "zz",
            first_token[:-2] + ("AA" if first_token[-2:] != "AA" else "BB"),
        ):
            await _refused(
                fn, req_cls(page_token=forged, **spec.fields()), ada, "INVALID_PAGE_TOKEN"
            )
        # Bound to the caller: another person's devices cannot use it.
        await _refused(
            fn, req_cls(page_token=first_token, **spec.fields()), bo, "INVALID_PAGE_TOKEN"
        )
        # Bound to the query: other parameters with this token are refused, with the reason.
        if spec.other_query is not None:
            details = await _refused(
                fn,
                req_cls(page_token=first_token, **spec.other_query()),
                ada,
                "PAGE_TOKEN_QUERY_MISMATCH",
            )
            assert "different query" in details
        # A token is not tied to page_size (AIP-158 allows changing it between pages).
        resp = await fn(
            req_cls(page_size=2, page_token=first_token, **spec.fields()),
            metadata=ada.metadata,
            timeout=10,
        )
        assert _items(resp) == all_items[1:3]


def test_all_modules_are_scanned() -> None:
    names = {m.__name__.rsplit(".", 1)[1] for m in MODULES}
    pkg = Path(v1.__file__).parent
    assert {p.stem for p in pkg.glob("*_pb2.py")} - {"common_pb2", "events_pb2"} <= names

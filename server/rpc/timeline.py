"""TimelineService: the calling user's merged, corrected-time timeline."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import struct
from typing import Any, Final

from pulsesync.server.context import RpcContext
from pulsesync.server.errors import InvalidArgument
from pulsesync.server.identity import Identity
from pulsesync.server.rpc.base import rpc_method
from pulsesync.server.rpc.convert import duration, ts
from pulsesync.server.rpc.pagination import page_size, page_tokens
from pulsesync.server.rpc.times import timestamp_us
from pulsesync.server.timeline.store import (
    MAX_SUMMARY_BUCKETS,
    ChangeCursor,
    Cursor,
    StoredEvent,
    TimelineStore,
)
from pulsesync.v1 import events_pb2, timeline_pb2, timeline_pb2_grpc

# AIP-158: a default that fills a screen, and a maximum that keeps one response well under a
# megabyte and one read under ~10 ms.
DEFAULT_PAGE_SIZE: Final = 200
MAX_PAGE_SIZE: Final = 1000
# A page of more events is built in a worker thread: ~5 us an event, so a full page would
# hold the event loop (and every other caller's request) for several milliseconds.
INLINE_PAGE_EVENTS: Final = 100
# A bucket narrower than a minute says nothing about steps or heart rate that the raw events
# do not; one hour is what a day view shows.
MIN_BUCKET_US: Final = 60 * 1_000_000
DEFAULT_BUCKET_US: Final = 3600 * 1_000_000

_KINDS: Final = frozenset(events_pb2.EventKind.values()) - {events_pb2.EVENT_KIND_UNSPECIFIED}


# version, digest of the user the token belongs to, then the change-feed cursor (change_id,
# seq). Not signed: it is read only within the caller's own events, so a made-up token can at
# most skip or repeat the caller's own changes; the digest catches a token of another account.
_SYNC_TOKEN: Final = struct.Struct(">B8sqq")
_SYNC_TOKEN_VERSION: Final = 1


def _user_digest(user_id: int) -> bytes:
    return hashlib.sha256(f"changes|{user_id}".encode()).digest()[:8]


def encode_sync_token(user_id: int, cursor: ChangeCursor) -> str:
    """An opaque change-feed token of the user for the position after cursor."""
    raw = _SYNC_TOKEN.pack(_SYNC_TOKEN_VERSION, _user_digest(user_id), cursor.change_id, cursor.seq)
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_sync_token(user_id: int, token: str) -> ChangeCursor:
    """The cursor in a token the user got from encode_sync_token; InvalidArgument otherwise."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        version, bound, change_id, seq = _SYNC_TOKEN.unpack(raw)
    except (binascii.Error, struct.error, ValueError):
        version, bound, change_id, seq = -1, b"", 0, 0
    if version != _SYNC_TOKEN_VERSION or bound != _user_digest(user_id) or change_id < 0 or seq < 0:
        raise InvalidArgument(
            "sync_token is not a token this server issued; sync again from the start "
            "(an empty sync_token)",
            reason="INVALID_SYNC_TOKEN",
        )
    return ChangeCursor(change_id, seq)


def _time_range(request: Any) -> tuple[int, int]:
    if not request.HasField("start_time") or not request.HasField("end_time"):
        raise InvalidArgument(
            "start_time and end_time are both required", reason="MISSING_TIME_RANGE"
        )
    start = timestamp_us(request.start_time, "start_time")
    end = timestamp_us(request.end_time, "end_time")
    if end <= start:
        raise InvalidArgument("end_time must be after start_time", reason="INVALID_TIME_RANGE")
    return start, end


def _events_page(
    events: list[StoredEvent], next_page_token: str
) -> timeline_pb2.ListEventsResponse:
    resp = timeline_pb2.ListEventsResponse(next_page_token=next_page_token)
    for e in events:
        item = resp.events.add(device_id=e.device_id, device_kind=e.device_kind)
        item.event.CopyFrom(e.event)
        item.time.CopyFrom(ts(e.t_us))
    return resp


class TimelineServicer(timeline_pb2_grpc.TimelineServiceServicer):
    def __init__(self, rpc: RpcContext, store: TimelineStore) -> None:
        self.rpc = rpc
        self.store = store

    @rpc_method(heavy=True)
    async def ListEvents(
        self, request: timeline_pb2.ListEventsRequest, context: Any, me: Identity
    ) -> timeline_pb2.ListEventsResponse:
        start, end = _time_range(request)
        size = page_size(request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        kinds = sorted({int(k) for k in request.kinds})
        unknown = [k for k in kinds if k not in _KINDS]
        if unknown:
            raise InvalidArgument(
                f"unknown event kinds {unknown}; use EventKind values", reason="INVALID_KIND"
            )
        devices = sorted(set(request.device_ids))
        query = (start, end, kinds, devices)
        tokens = page_tokens(self.rpc.page_token_secret)
        pos = tokens.decode(request.page_token, "ListEvents", me.user_id, query)
        after = Cursor(int(pos[0]), int(pos[1]), int(pos[2])) if pos else None
        events, cursor = await self.store.page(
            me.user_id, start, end, kinds, device_ids=devices, after=after, limit=size
        )
        token = (
            tokens.encode(
                "ListEvents", me.user_id, query, [cursor.t_us, cursor.device_pk, cursor.seq]
            )
            if cursor is not None
            else ""
        )
        if len(events) > INLINE_PAGE_EVENTS:
            return await asyncio.to_thread(_events_page, events, token)
        return _events_page(events, token)

    @rpc_method(heavy=True)
    async def SummarizeActivity(
        self, request: timeline_pb2.SummarizeActivityRequest, context: Any, me: Identity
    ) -> timeline_pb2.SummarizeActivityResponse:
        start, end = _time_range(request)
        bucket = request.bucket.ToMicroseconds() if request.HasField("bucket") else 0
        bucket = bucket or DEFAULT_BUCKET_US
        if bucket < MIN_BUCKET_US:
            raise InvalidArgument("bucket must be at least one minute", reason="INVALID_BUCKET")
        if (end - start) // bucket > MAX_SUMMARY_BUCKETS:
            raise InvalidArgument(
                f"the range holds more than {MAX_SUMMARY_BUCKETS} buckets; "
                "use wider buckets or a shorter range",
                reason="TOO_MANY_BUCKETS",
            )
        buckets = await self.store.summarize(me.user_id, start, end, bucket)
        resp = timeline_pb2.SummarizeActivityResponse()
        for b in buckets:
            out = resp.buckets.add(
                steps=b.steps,
                mean_heart_rate_bpm=b.mean_heart_rate_bpm,
                hrv_rmssd_ms=b.hrv_rmssd_ms,
                event_count=b.event_count,
            )
            out.start_time.CopyFrom(ts(b.start_us))
            for app_name, us in b.app_time_us.items():
                out.app_time[app_name].CopyFrom(duration(us))
        return resp

    @rpc_method()
    async def ListEventChanges(
        self, request: timeline_pb2.ListEventChangesRequest, context: Any, me: Identity
    ) -> timeline_pb2.ListEventChangesResponse:
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative", reason="INVALID_PAGE_SIZE")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = (
            decode_sync_token(me.user_id, request.sync_token)
            if request.sync_token
            else ChangeCursor(0, 0)
        )
        events, cursor, caught_up = await self.store.changes(me.user_id, after, size)
        resp = timeline_pb2.ListEventChangesResponse(
            next_sync_token=encode_sync_token(me.user_id, cursor), caught_up=caught_up
        )
        for e in events:
            item = resp.events.add(device_id=e.device_id, device_kind=e.device_kind)
            item.event.CopyFrom(e.event)
            item.time.CopyFrom(ts(e.t_us))
        return resp

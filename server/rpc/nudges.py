"""NudgeService: context-aware nudges delivered to the device in use, and their feedback."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Final

from pulsesync.server.context import RpcContext
from pulsesync.server.errors import InvalidArgument, NotFound
from pulsesync.server.identity import Identity
from pulsesync.server.nudges.delivery import nudge_message
from pulsesync.server.nudges.engine import NudgeEngine
from pulsesync.server.rpc.base import Idempotent, rpc_method
from pulsesync.server.rpc.pagination import page_size, page_tokens
from pulsesync.server.rpc.times import timestamp_us
from pulsesync.timeutil import optional_timestamp as _ts
from pulsesync.v1 import events_pb2, nudges_pb2, nudges_pb2_grpc

log = logging.getLogger(__name__)

# AIP-158: a screen of history by default; larger requests are clamped to the maximum,
# which keeps one response (each nudge with its feedback) well under a megabyte.
DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 500
# FCM tokens run to ~200 characters and APNs ones to 64 hex digits; 4 KiB leaves room for a
# gateway's own envelope without letting a device store megabytes.
MAX_PUSH_TOKEN: Final = 4096


class NudgeServicer(nudges_pb2_grpc.NudgeServiceServicer):
    def __init__(self, rpc: RpcContext, engine: NudgeEngine) -> None:
        self.rpc = rpc
        self.engine = engine

    @rpc_method(stream=True)
    async def SubscribeNudges(
        self, request: Any, context: Any, me: Identity
    ) -> AsyncIterator[nudges_pb2.SubscribeNudgesResponse]:
        queue = self.engine.open_stream(me.user_id, me.device_pk, me.device_id, me.device_kind)
        try:
            for nudge in await self.engine.pending_for(me.user_id, me.device_pk, me.device_id):
                # Once: a nudge the app fetched (or a push delivered) meanwhile is not resent.
                if await self.engine.mark_delivered(nudge.nudge_id, me.device_pk):
                    yield nudges_pb2.SubscribeNudgesResponse(nudge=nudge)
            while True:
                item = await queue.get()
                if item is None:
                    return  # a newer stream of this device took over
                nudge = item
                if nudge.expire_time.ToMicroseconds() <= self.rpc.clock.now_us():
                    continue
                await self.engine.mark_delivered(nudge.nudge_id, me.device_pk)
                yield nudges_pb2.SubscribeNudgesResponse(nudge=nudge)
        finally:
            await self.engine.close_stream(me.device_pk, queue)

    @rpc_method(idempotent=Idempotent())
    async def RecordNudgeFeedback(
        self, request: Any, context: Any, me: Identity
    ) -> nudges_pb2.RecordNudgeFeedbackResponse:
        if not request.nudge_id:
            raise InvalidArgument(
                "nudge_id is required: send the id of the nudge shown", reason="MISSING_FIELD"
            )
        if request.action not in events_pb2.NudgeAction.values() or request.action == 0:
            raise InvalidArgument(
                "action must be DELIVERED, OPENED, DISMISSED or ACTED",
                reason="INVALID_NUDGE_ACTION",
            )
        if not await self.engine.owns(me.user_id, request.nudge_id):
            raise NotFound(f"no nudge {request.nudge_id!r} for this user", reason="NUDGE_NOT_FOUND")
        now = self.rpc.clock.now_us()
        at = (
            timestamp_us(request.action_time, "action_time")
            if request.HasField("action_time")
            else now
        )
        # Once per action per nudge: a retry (or the same feedback uploaded as an event)
        # succeeds and records nothing more.
        await self.engine.record_feedback(
            me.user_id, request.nudge_id, me.device_pk, int(request.action), at, now
        )
        return nudges_pb2.RecordNudgeFeedbackResponse()

    @rpc_method(idempotent=Idempotent())
    async def FetchPendingNudges(
        self, request: Any, context: Any, me: Identity
    ) -> nudges_pb2.FetchPendingNudgesResponse:
        nudges = await self.engine.fetch_pending(
            me.user_id, me.device_pk, me.device_id, me.device_kind
        )
        return nudges_pb2.FetchPendingNudgesResponse(nudges=nudges)

    @rpc_method(idempotent=Idempotent())
    async def RegisterPushTarget(
        self, request: Any, context: Any, me: Identity
    ) -> nudges_pb2.RegisterPushTargetResponse:
        if len(request.push_token) > MAX_PUSH_TOKEN:
            raise InvalidArgument(
                f"push_token is longer than {MAX_PUSH_TOKEN} characters",
                reason="INVALID_PUSH_TOKEN",
            )
        await self.engine.register_push_target(
            me.user_id, me.device_pk, me.device_id, me.device_kind, request.push_token
        )
        return nudges_pb2.RegisterPushTargetResponse()

    @rpc_method(heavy=True)
    async def ListNudges(
        self, request: Any, context: Any, me: Identity
    ) -> nudges_pb2.ListNudgesResponse:
        size = page_size(request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        start = (
            timestamp_us(request.start_time, "start_time") if request.HasField("start_time") else 0
        )
        end = timestamp_us(request.end_time, "end_time") if request.HasField("end_time") else 2**62
        tokens = page_tokens(self.rpc.page_token_secret)
        pos = tokens.decode(request.page_token, "ListNudges", me.user_id, (start, end))
        after = (int(pos[0]), str(pos[1])) if pos else None
        # Keyset paging on (create_us DESC, nudge_id): a page never skips or repeats a nudge
        # when new ones arrive between calls, and reading page k costs the same as page 1.
        rows = await self.engine.history_page(me.user_id, start, end, after, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        records = [
            nudges_pb2.NudgeRecord(
                nudge=nudge_message(r.nudge, r.device_id or ""),
                feedback=r.feedback,  # type: ignore[arg-type]
                outcome=nudges_pb2.NudgeOutcome(
                    metric=r.outcome_metric,
                    value=r.outcome_value or 0.0,
                    complete=r.outcome_complete,
                ),
                deliver_time=_ts(r.deliver_us),
            )
            for r in rows
        ]
        token = (
            tokens.encode(
                "ListNudges",
                me.user_id,
                (start, end),
                [rows[-1].nudge.create_us, rows[-1].nudge.nudge_id],
            )
            if more and rows
            else ""
        )
        return nudges_pb2.ListNudgesResponse(nudges=records, next_page_token=token)
